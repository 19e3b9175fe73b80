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
from dataclasses import dataclass

import asyncpg
import httpx
import pytest

from tests.conftest import PASSWORD, basic, client_config, create_database
from tests.oauth import code_flow, redeem, refresh
from tests.postgres import dedicated_cluster, free_port
from tests.server import iam, serve, write_config

BOUND = 3.0  # store_timeout: the longest a request may wait for its store
SLACK = 2.0  # for a loaded 2-core machine; the behaviour is "503 within the bound", not the exact time
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
PURGE_BATCH = 100


@dataclass
class Instance:
    base: str
    databases: dict[str, str]  # store name -> its PostgreSQL database, for asyncpg


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
    # Purging every second or so in batches of PURGE_BATCH: a backlog takes many batches.
    config = write_config(directory, issuer=base, clients=client_config(), purge_interval=1,
                          purge_batch=PURGE_BATCH, store_timeout=BOUND)
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
        yield Instance(url, {name: f"{database.url}/{db}" for name, db in names.items()})


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
    base = instance.base
    # Several pooled connections, all of which the restart closes.
    assert [r.status_code for r in concurrently(lambda: issue(base), 8)] == [200] * 8
    token = issue(base).json()["access_token"]

    database.restart()
    back = time.monotonic()

    ready = httpx.get(f"{base}/health/ready", timeout=30)
    assert ready.status_code == 200, ready.text  # the first probe after the restart
    print(f"database back to first 200: {time.monotonic() - back:.3f} s")
    assert [r.status_code for r in concurrently(lambda: issue(base), 8)] == [200] * 8
    assert [issue(base).status_code for _ in range(10)] == [200] * 10
    found = introspect(base, token)
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
    base = instance.base
    (code, verifier), refresh_token = asyncio.run(_code_and_refresh_token(base))
    token = issue(base).json()["access_token"]

    async def redeem_code():
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            return await redeem(http, code, verifier)

    async def use_refresh_token():
        async with httpx.AsyncClient(base_url=base, timeout=30) as http:
            return await refresh(http, refresh_token)

    with database.frozen():
        for call in (lambda: issue(base), lambda: asyncio.run(redeem_code()),
                     lambda: asyncio.run(use_refresh_token())):
            assert _unavailable_within_bound(call).json()["error"] == "temporarily_unavailable"
        _unavailable_within_bound(lambda: httpx.get(f"{base}/health/ready", timeout=30))
        # Requests at once, more than the pool holds: each still gets its answer within the bound.
        started = time.monotonic()
        statuses = concurrently(lambda: issue(base).status_code, 30)
        assert statuses == [503] * 30 and time.monotonic() - started < 2 * (BOUND + SLACK)

    deadline = time.monotonic() + 30
    while httpx.get(f"{base}/health/ready", timeout=30).status_code != 200:
        assert time.monotonic() < deadline, "not ready again after the database resumed"
        time.sleep(0.1)
    assert issue(base).status_code == 200
    assert introspect(base, token).json()["active"] is True
    redeemed = asyncio.run(redeem_code())
    assert redeemed.status_code == 200, redeemed.text  # the code tried during the hang was not consumed
    refreshed = asyncio.run(use_refresh_token())
    assert refreshed.status_code == 200, refreshed.text  # nor the refresh token


EXPIRED = {  # a backlog in every table that grows with use; `expires_at` 1000 is long past
    "token": [
        "INSERT INTO access_tokens (digest, client_id, subject, expires_at, revoked, jwt)"
        " SELECT sha256(('a' || i)::bytea), 'svc-basic', 'svc-basic', 1000, false, 'x' FROM generate_series(1, 2500) i",
        "INSERT INTO grants (id, client_id, subject, scope, auth_time, amr, offline, created_at, expires_at, revoked)"
        " SELECT 'g' || i, 'webapp', 's', 'openid', 900, 'pwd', true, 900, 1000, false FROM generate_series(1, 300) i",
        "INSERT INTO refresh_tokens (digest, grant_id, issued_at, expires_at, revoked)"
        " SELECT sha256(('r' || i)::bytea), 'g' || i, 900, 1000, false FROM generate_series(1, 300) i",
        "INSERT INTO codes (digest, grant_id, redirect_uri, expires_at, consumed)"
        " SELECT sha256(('c' || i)::bytea), 'g' || i, 'https://app.test/cb', 1000, true FROM generate_series(1, 300) i",
        "INSERT INTO authorization_requests (id, client_id, redirect_uri, scope, created_at, expires_at)"
        " SELECT 'p' || i, 'webapp', 'https://app.test/cb', 'openid', 900, 1000 FROM generate_series(1, 300) i",
        "INSERT INTO device_codes (digest, user_code, client_id, scope, interval, last_poll, status, expires_at)"
        " SELECT sha256(('d' || i)::bytea), sha256(('u' || i)::bytea), 'kubectl', 'openid', 5, 900, 'pending', 1000"
        " FROM generate_series(1, 300) i",
    ],
    "authn": [
        "INSERT INTO sessions (digest, sid, subject, auth_time, amr, created_at, last_seen, expires_at, revoked)"
        " SELECT sha256(('s' || i)::bytea), 'sid' || i, 's', 900, 'pwd', 900, 900, 1000, false"
        " FROM generate_series(1, 300) i",
    ],
}
EXPIRED_COUNT = {
    "token": "SELECT (SELECT count(*) FROM access_tokens WHERE expires_at < 2000)"
             " + (SELECT count(*) FROM refresh_tokens WHERE expires_at < 2000)"
             " + (SELECT count(*) FROM codes WHERE expires_at < 2000)"
             " + (SELECT count(*) FROM authorization_requests WHERE expires_at < 2000)"
             " + (SELECT count(*) FROM device_codes WHERE expires_at < 2000)"
             " + (SELECT count(*) FROM grants WHERE expires_at < 2000)",
    "authn": "SELECT count(*) FROM sessions WHERE expires_at < 2000",
}


async def _run(database: str, statements: list[str]) -> list:
    conn = await asyncpg.connect(database)
    try:
        return [await conn.fetchval(statement) for statement in statements]
    finally:
        await conn.close()


def test_expired_rows_are_purged_while_tokens_are_issued(instance):
    """A backlog many batches deep goes, batch after batch, while issuance goes on unhindered; live rows stay."""
    for store, statements in EXPIRED.items():
        asyncio.run(_run(instance.databases[store], statements))
    token = issue(instance.base).json()["access_token"]

    def issuing() -> list[int]:
        return [issue(instance.base).status_code for _ in range(20)]

    statuses: list[int] = []
    deadline = time.monotonic() + 60
    left = {store: None for store in EXPIRED}
    while any(left.values()) or None in left.values():
        assert time.monotonic() < deadline, f"expired rows left: {left}"
        statuses += [status for batch in concurrently(issuing, 4) for status in batch]
        left = {store: asyncio.run(_run(instance.databases[store], [EXPIRED_COUNT[store]]))[0] for store in EXPIRED}
    assert set(statuses) == {200}
    found = introspect(instance.base, token)  # a live token is never purged
    assert found.status_code == 200 and found.json()["active"] is True
