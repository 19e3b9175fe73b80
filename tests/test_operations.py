"""Operating a real `iam serve` on a real PostgreSQL that restarts and hangs.

- A restart (`pg_ctl restart`, every pooled connection closed by the server) is invisible once the database
  is back: readiness answers 200 on its first probe and no request fails.
- A hung database (every PostgreSQL process SIGSTOPped) turns requests into 503 temporarily_unavailable
  within the store's time bound, readiness too; once it runs again everything works, and what was tried
  during the hang (a code, a refresh token) was not consumed.

The cluster is this module's own (tests/postgres.py), so freezing it disturbs no other test.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import PASSWORD, basic, client_config, create_database
from tests.oauth import code_flow, redeem, refresh
from tests.postgres import dedicated_cluster, free_port
from tests.server import iam, serve, write_config

BOUND = 3.0  # store_timeout: the longest a request may wait for its store
SLACK = 2.0  # for a loaded 2-core machine; the behaviour is "503 within the bound", not the exact time
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.fixture(scope="module")
def database():
    with dedicated_cluster() as server:
        yield server


@pytest.fixture(scope="module")
def instance(database, tmp_path_factory):
    """SERVICE_ROLE=all with its three stores on the module's cluster, and alice to sign in."""
    directory = tmp_path_factory.mktemp("operations")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    host = database.url.split("://", 1)[1]
    names = {name: asyncio.run(create_database(database.url)) for name in ("authn", "token", "users")}
    config = write_config(directory, issuer=base, clients=client_config(), purge_interval=0,
                          store_timeout=BOUND)
    env = {
        "IAM_CONFIG": str(config),
        "SERVICE_ROLE": "all",
        "IAM_KEYS_DIR": str(directory / "keys"),
        **{f"IAM_{name.upper()}_DATABASE_URL": f"postgresql+asyncpg://{host}/{db}" for name, db in names.items()},
    }
    migrated = iam("migrate", env=env, cwd=directory)
    assert migrated.returncode == 0, migrated.stderr
    added = iam("users", "add", "--username", "alice", "--email", "alice@example.com", "--password-stdin",
                env=env, cwd=directory, input=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    with serve(env, directory, port=port) as (url, _process):
        yield url


def issue(base: str) -> httpx.Response:
    return httpx.post(f"{base}/oauth/v2/token", headers={**basic("svc-basic"), **FORM},
                      data={"grant_type": "client_credentials"}, timeout=30)


def introspect(base: str, token: str) -> httpx.Response:
    return httpx.post(f"{base}/oauth/v2/introspect", headers={**basic("svc-basic"), **FORM},
                      data={"token": token}, timeout=30)


def concurrently(call, count: int) -> list:
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda _: call(), range(count)))


def test_a_database_restart_is_invisible_once_it_is_back(instance, database):
    # Several pooled connections, all of which the restart closes.
    assert [r.status_code for r in concurrently(lambda: issue(instance), 8)] == [200] * 8
    token = issue(instance).json()["access_token"]

    database.restart()
    back = time.monotonic()

    ready = httpx.get(f"{instance}/health/ready", timeout=30)
    assert ready.status_code == 200, ready.text  # the first probe after the restart
    print(f"database back to first 200: {time.monotonic() - back:.3f} s")
    assert [r.status_code for r in concurrently(lambda: issue(instance), 8)] == [200] * 8
    assert [issue(instance).status_code for _ in range(10)] == [200] * 10
    found = introspect(instance, token)
    assert found.status_code == 200 and found.json()["active"] is True


async def _code_and_refresh_token(base: str) -> tuple[tuple[str, str], str]:
    """An unredeemed code (with its verifier), and a refresh token, for the webapp client."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        params, verifier, _ = await code_flow(http, scope="openid offline_access")
        redeemed = await redeem(http, params["code"], verifier)
        assert redeemed.status_code == 200, redeemed.text
        params, second_verifier, _ = await code_flow(http, scope="openid offline_access")
        return (params["code"], second_verifier), redeemed.json()["refresh_token"]


def _unavailable_within_bound(call) -> httpx.Response:
    started = time.monotonic()
    response = call()
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.text
    assert elapsed < BOUND + SLACK, f"answered after {elapsed:.1f} s"
    print(f"hang to 503: {elapsed:.3f} s")
    return response


def test_a_hung_database_answers_503_within_the_bound_and_consumes_nothing(instance, database):
    (code, verifier), refresh_token = asyncio.run(_code_and_refresh_token(instance))
    token = issue(instance).json()["access_token"]

    async def redeem_code():
        async with httpx.AsyncClient(base_url=instance, timeout=30) as http:
            return await redeem(http, code, verifier)

    async def use_refresh_token():
        async with httpx.AsyncClient(base_url=instance, timeout=30) as http:
            return await refresh(http, refresh_token)

    with database.frozen():
        for call in (lambda: issue(instance), lambda: asyncio.run(redeem_code()),
                     lambda: asyncio.run(use_refresh_token())):
            assert _unavailable_within_bound(call).json()["error"] == "temporarily_unavailable"
        _unavailable_within_bound(lambda: httpx.get(f"{instance}/health/ready", timeout=30))
        # Requests at once, more than the pool holds: each still gets its answer within the bound.
        started = time.monotonic()
        statuses = concurrently(lambda: issue(instance).status_code, 30)
        assert statuses == [503] * 30 and time.monotonic() - started < 2 * (BOUND + SLACK)

    deadline = time.monotonic() + 30
    while httpx.get(f"{instance}/health/ready", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "not ready again after the database resumed"
        time.sleep(0.1)
    assert issue(instance).status_code == 200
    assert introspect(instance, token).json()["active"] is True
    redeemed = asyncio.run(redeem_code())
    assert redeemed.status_code == 200, redeemed.text  # the code tried during the hang was not consumed
    refreshed = asyncio.run(use_refresh_token())
    assert refreshed.status_code == 200, refreshed.text  # nor the refresh token
