"""SIGTERM drains a real `iam serve`: readiness turns 503 at once, everything else keeps working for the drain
delay, requests in flight when the port closes still finish, and the process exits 0 within the grace time."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from tests.conftest import basic
from tests.server import serve, token_role_env

DRAIN = 2.0  # IAM_DRAIN_DELAY for these tests
GRACE = 20  # `iam serve --grace` default
SLOW = 12  # token requests whose bodies trickle in across the whole drain and into the shutdown
BUSY = 4  # threads sending back-to-back token requests during the drain
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture
def token_env(tmp_path):
    return {**token_role_env(tmp_path), "IAM_DRAIN_DELAY": str(DRAIN)}


def issue(base: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{base}/oauth/v2/token", headers={**basic("svc-basic"), **FORM}, timeout=30, **kwargs)


def test_sigterm_drains_then_shuts_down_without_failing_a_request(tmp_path, token_env):
    with serve(token_env, tmp_path) as (base, process):
        started = threading.Semaphore(0)
        outcomes: list[object] = []

        def slow_body():
            yield b"grant_type=client_"
            started.release()  # runs once the first chunk is on the wire: the request is in flight
            time.sleep(DRAIN + 1)  # ends after the drain, while uvicorn is already shutting down
            yield b"credentials"

        def slow_request() -> None:
            try:
                response = issue(base, content=slow_body())
                outcomes.append((response.status_code, "access_token" in response.json()))
            except Exception as exc:  # a failed in-flight request is what this test is about
                outcomes.append(exc)

        stop_busy = threading.Event()
        busy_failures: list[object] = []
        busy_count = [0]

        def busy() -> None:
            for _ in range(1000):  # bounded; stopped well before the port closes
                if stop_busy.is_set():
                    return
                try:
                    response = issue(base, data={"grant_type": "client_credentials"})
                    if response.status_code != 200:
                        busy_failures.append(response.status_code)
                    busy_count[0] += 1
                except Exception as exc:
                    busy_failures.append(exc)

        slow = [threading.Thread(target=slow_request) for _ in range(SLOW)]
        busy_threads = [threading.Thread(target=busy) for _ in range(BUSY)]
        for thread in slow + busy_threads:
            thread.start()
        for _ in range(SLOW):
            assert started.acquire(timeout=10), "slow requests did not start"

        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)

        # During the drain: not ready, but alive and serving new requests on new connections.
        checks = 0
        while time.monotonic() < signalled + DRAIN / 2 and checks < 100:  # well before the port closes
            ready = httpx.get(f"{base}/health/ready", timeout=5)
            assert ready.status_code == 503 and ready.json() == {"status": "draining"}
            assert httpx.get(f"{base}/health/live", timeout=5).status_code == 200
            assert issue(base, data={"grant_type": "client_credentials"}).status_code == 200
            checks += 1
        assert checks >= 1, "the drain delay ended before it could be observed"
        stop_busy.set()

        for thread in busy_threads + slow:
            thread.join(timeout=30)
        assert busy_failures == [] and busy_count[0] > 0
        assert outcomes == [(200, True)] * SLOW, outcomes

        assert process.wait(timeout=GRACE) == 0
        assert time.monotonic() - signalled >= DRAIN  # the port stayed open for the whole drain delay
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{base}/health/live", timeout=2)


def test_a_second_signal_ends_the_drain_delay(tmp_path, token_env):
    with serve({**token_env, "IAM_DRAIN_DELAY": "60"}, tmp_path) as (base, process):
        process.send_signal(signal.SIGTERM)
        assert httpx.get(f"{base}/health/ready", timeout=5).status_code == 503
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=GRACE) == 0
        assert time.monotonic() - signalled < 10


def test_keep_alive_clients_lose_no_request_on_sigterm(tmp_path, token_env):
    """Clients that keep their connections open and never look at readiness (an ingress's keep-alive upstream
    pool): every request written on a connection the server accepted is answered. During the drain the
    answers say `Connection: close`; once the port is closed a new connection is refused, which the client
    sees before it sends anything."""
    with serve(token_env, tmp_path) as (base, process):
        stop = threading.Event()
        answered: list[httpx.Response] = []
        lost: list[Exception] = []  # a request sent and never answered: what must not happen

        def keep_alive_client() -> None:
            with httpx.Client(base_url=base, timeout=30) as http:
                while not stop.is_set():
                    try:
                        answered.append(http.post("/oauth/v2/token", headers={**basic("svc-basic"), **FORM},
                                                  data={"grant_type": "client_credentials"}))
                    except httpx.ConnectError:  # nothing listens any more: never sent
                        time.sleep(0.05)
                    except httpx.TransportError as exc:
                        lost.append(exc)

        clients = [threading.Thread(target=keep_alive_client) for _ in range(BUSY * 2)]
        for thread in clients:
            thread.start()
        deadline = time.monotonic() + 20
        while len(answered) < 50 and time.monotonic() < deadline:
            time.sleep(0.05)
        before = len(answered)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=GRACE) == 0
        stop.set()
        for thread in clients:
            thread.join(timeout=30)

        assert lost == [], f"{len(lost)} requests lost: {lost[:3]!r}"
        assert len(answered) > before  # the load went on through the drain
        assert all(response.status_code == 200 for response in answered)
        # Before the signal connections were kept open; during the drain each answer closed its connection.
        assert answered[0].headers.get("connection") != "close"
        assert any(response.headers.get("connection") == "close" for response in answered[before:])


async def test_stopping_a_background_task_that_swallows_a_cancellation_does_not_hang():
    """On Python 3.11 `asyncio.wait_for` can lose a cancellation that arrives as its awaitable completes; the task
    then goes on running. Stopping it must still end (it is cancelled again), not wait for ever."""
    import asyncio

    from iam.tasks import cancel

    swallowed = []

    async def loop_that_loses_one_cancellation():
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed.append(True)  # the first cancellation is lost, as wait_for would lose it

    task = asyncio.create_task(loop_that_loses_one_cancellation())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel(task), 5)
    assert task.cancelled() and swallowed == [True]
