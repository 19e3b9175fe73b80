"""The hot cache of live access tokens (iam/token/hot_cache.py).

With the cache warm, every kind of revocation still takes effect at once: on the instance that revokes,
and (PostgreSQL) on every other instance through notifications, two instances in one process and two
`iam serve` processes alike. While an instance's revocation listener is down it bypasses the cache. An
entry never outlives its token nor the staleness bound; the size bound holds; nothing negative is cached.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import ExitStack
from types import SimpleNamespace

import asyncpg
import httpx
import pytest

from iam.app import create_app
from iam.token.access_tokens import LiveToken, digest
from iam.token.hot_cache import HotCache, RevocationListener
from iam.token.store import AccessTokenRow
from tests.conftest import ISSUER, basic, create_database, make_settings
from tests.oauth import refresh
from tests.server import serve, token_role_env
from tests.test_code_grant import tokens_for
from tests.test_token_endpoint import get_token

UNKNOWN = "A" * 43  # well-formed, never issued


# -- helpers ---------------------------------------------------------------------------------------------
async def cache_on(app) -> None:
    """On PostgreSQL the cache is on only once the revocation listener is connected."""
    runtime = app.state.iam
    if runtime.token.revocation_listener is not None:
        await runtime.token.revocation_listener.wait_connected(10)
    assert runtime.token.hot_cache.enabled


async def introspect(http, token: str, accept: str | None = None) -> httpx.Response:
    headers = {**basic("svc-basic"), **({"Accept": accept} if accept else {})}
    return await http.post("/oauth/v2/introspect", data={"token": token}, headers=headers)


async def is_active(http, token: str) -> bool:
    return (await introspect(http, token)).json()["active"]


async def phantom(http, token: str) -> int:
    return (await http.get("/oauth/v2/phantom", headers={"Authorization": f"Bearer {token}"})).status_code


async def warm(app, http, token: str) -> None:
    await cache_on(app)
    assert await is_active(http, token)
    assert await phantom(http, token) == 200
    assert digest(token) in app.state.iam.token.hot_cache


async def assert_inactive_everywhere(http, token: str) -> None:
    assert (await introspect(http, token)).json() == {"active": False}
    assert (await introspect(http, token, "application/jwt")).json() == {"active": False}
    assert await phantom(http, token) == 401


async def eventually_inactive(http, token: str, within: float = 1.0) -> float:
    """Poll until the token is inactive (introspection and forward-auth); return how long it took."""
    started = time.monotonic()
    while not (await phantom(http, token) == 401 and not await is_active(http, token)):
        assert time.monotonic() - started < within, f"still active after {within} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def until(condition, within: float = 1.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def count_lookups(app, monkeypatch) -> list[bytes]:
    store = app.state.iam.token.store
    original = store.find_access_token
    seen: list[bytes] = []

    async def counted(key: bytes):
        seen.append(key)
        return await original(key)

    monkeypatch.setattr(store, "find_access_token", counted)
    return seen


def second_instance(settings):
    """Another replica: its own app, pool, cache and listener, on the same token database."""
    application = create_app(settings)
    return application, httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url=ISSUER)


def revoke(http, token: str, client_id: str = "svc-basic"):
    return http.post("/oauth/v2/revoke", data={"token": token}, headers=basic(client_id))


# -- the cache itself ------------------------------------------------------------------------------------
def entry(n: int, *, grant: str | None = None, subject: str = "sub", expires_at: int = 2**31 - 1,
          until: float = 2**31 - 1) -> tuple[bytes, LiveToken]:
    key = n.to_bytes(32, "big")
    return key, LiveToken(AccessTokenRow(key, "c", subject, expires_at, False, "h.e30.s", grant), until)


def test_lru_bound_and_indexes_stay_consistent():
    cache = HotCache(5, max_entries=3)
    for n in range(5):
        key, value = entry(n, grant=f"g{n % 2}", subject=f"s{n}")
        assert cache.put(key, value, cache.generation)
    assert len(cache) == 3
    assert [n for n in range(5) if entry(n)[0] in cache] == [2, 3, 4]  # the least recently used went first
    assert cache.get(entry(2)[0], 0) is not None  # 2 is now the most recently used ...
    cache.put(*entry(5), cache.generation)
    assert entry(2)[0] in cache and entry(3)[0] not in cache  # ... so 3 went
    assert all(digests for digests in cache._by_grant.values())
    assert {d for ds in cache._by_subject.values() for d in ds} == set(cache._entries)
    cache.evict_grant("g0")  # entries 2 and 4
    assert entry(2)[0] not in cache and entry(4)[0] not in cache and entry(5)[0] in cache
    cache.evict_subject("sub")
    assert len(cache) == 0 and not cache._by_grant and not cache._by_subject


def test_an_entry_is_served_only_before_its_bound():
    cache = HotCache(5)
    assert cache.until(expires_at=1000, now=100) == 105  # the staleness bound
    assert cache.until(expires_at=1000, now=998) == 1000  # never past the token's expiry
    key, value = entry(1, until=105)
    cache.put(key, value, cache.generation)
    assert cache.get(key, 104.9) is value
    assert cache.get(key, 105) is None and key not in cache


def test_a_fill_that_raced_a_revocation_is_not_kept():
    cache = HotCache(5)
    key, value = entry(1, grant="g")
    generation = cache.generation  # read before the store lookup
    cache.evict_grant("g")  # a revocation lands while the lookup is in flight
    assert not cache.put(key, value, generation)
    assert key not in cache


def test_notices_evict_and_anything_unreadable_clears():
    cache = HotCache(5)
    for n, grant, subject in ((1, "g1", "alice"), (2, "g2", "bob"), (3, None, "svc"), (4, None, "carol")):
        cache.put(*entry(n, grant=grant, subject=subject), cache.generation)
    cache.apply("d:" + entry(3)[0].hex())
    cache.apply("g:g1")
    cache.apply("s:bob")
    assert len(cache) == 1 and entry(4)[0] in cache
    cache.apply("x:whatever")
    assert len(cache) == 0


def test_a_disabled_cache_keeps_nothing():
    cache = HotCache(5, enabled=False)
    key, value = entry(1)
    assert not cache.put(key, value, cache.generation) and cache.get(key, 0) is None
    assert not HotCache(0).enabled  # introspection_cache_seconds: 0 turns it off


async def test_a_listener_whose_connection_stops_answering_turns_the_cache_off():
    """No notice comes over a connection that hangs: the periodic ping notices, and the cache is bypassed."""

    class Hung:
        def __init__(self):
            self.closed = False

        def add_termination_listener(self, callback):
            pass

        async def add_listener(self, channel, callback):
            pass

        async def fetchval(self, query):
            await asyncio.sleep(3600)

        def is_closed(self):
            return self.closed

        def terminate(self):
            self.closed = True

        def get_server_pid(self):
            return 1

    connections = []

    async def connect():
        connections.append(Hung())
        return connections[-1]

    cache = HotCache(5, enabled=False)
    listener = RevocationListener(cache, connect)
    listener.PING_INTERVAL = listener.PING_TIMEOUT = 0.05
    listener.start()
    try:
        await listener.wait_connected(1)
        assert cache.enabled
        await until(lambda: not cache.enabled, 1)  # the ping timed out
        assert connections[0].closed
        await until(lambda: len(connections) >= 2, 2)  # and it reconnects
    finally:
        await listener.stop()
    assert not cache.enabled


# -- one instance, both backends -------------------------------------------------------------------------
async def test_a_warm_token_costs_no_lookup(client, app, monkeypatch):
    token = (await get_token(client))["access_token"]
    await cache_on(app)
    lookups = count_lookups(app, monkeypatch)
    assert await is_active(client, token)
    assert len(lookups) == 1
    assert (await introspect(client, token, "application/jwt")).status_code == 200
    assert await phantom(client, token) == 200
    assert await is_active(client, token)
    assert len(lookups) == 1


async def test_revocation_is_immediate_with_a_warm_cache(client, app):
    token = (await get_token(client))["access_token"]
    other = (await get_token(client))["access_token"]
    await warm(app, client, token)
    await warm(app, client, other)
    assert (await revoke(client, token)).status_code == 200
    await assert_inactive_everywhere(client, token)
    assert await is_active(client, other) and digest(other) in app.state.iam.token.hot_cache  # only that token


async def test_revoking_a_refresh_token_evicts_its_grants_access_tokens(client, app, alice):
    body = await tokens_for(client)
    await warm(app, client, body["access_token"])
    assert (await revoke(client, body["refresh_token"], "webapp")).status_code == 200
    await assert_inactive_everywhere(client, body["access_token"])


async def test_refresh_token_reuse_evicts_the_family(client, app, alice):
    first = await tokens_for(client)
    second = (await refresh(client, first["refresh_token"])).json()
    await warm(app, client, first["access_token"])
    await warm(app, client, second["access_token"])
    reuse = await refresh(client, first["refresh_token"])
    assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"
    await assert_inactive_everywhere(client, first["access_token"])
    await assert_inactive_everywhere(client, second["access_token"])


async def test_logout_evicts_the_sessions_grants(client, app, alice):
    web = await tokens_for(client)
    await warm(app, client, web["access_token"])
    response = await client.get("/oauth/v2/end_session", params={
        "id_token_hint": web["id_token"], "post_logout_redirect_uri": "https://app.test/bye"})
    assert response.status_code == 302
    await assert_inactive_everywhere(client, web["access_token"])


async def test_a_disabled_subject_is_evicted(client, app, alice):
    web = await tokens_for(client)
    await warm(app, client, web["access_token"])
    await app.state.iam.token.store.revoke_subject(alice)
    await assert_inactive_everywhere(client, web["access_token"])


async def test_an_expired_token_is_never_served_from_the_cache(client, app, monkeypatch):
    token = (await get_token(client))["access_token"]  # svc-basic: 600 s
    app.state.iam.token.hot_cache.seconds = 3600  # only the token's own expiry bounds the entry now
    await warm(app, client, token)
    later = time.time() + 601
    monkeypatch.setattr(app.state.iam.token.access_tokens, "clock", lambda: later)
    await assert_inactive_everywhere(client, token)
    assert digest(token) not in app.state.iam.token.hot_cache


async def test_an_entry_is_read_again_after_the_staleness_bound(client, app, monkeypatch):
    token = (await get_token(client))["access_token"]
    await warm(app, client, token)
    lookups = count_lookups(app, monkeypatch)
    assert await is_active(client, token) and lookups == []
    later = time.time() + app.state.iam.settings.introspection_cache_seconds + 0.5
    monkeypatch.setattr(app.state.iam.token.access_tokens, "clock", lambda: later)
    assert await is_active(client, token) and len(lookups) == 1
    assert await phantom(client, token) == 200 and len(lookups) == 1  # cached again, for another N s


async def test_unknown_and_revoked_tokens_are_not_cached(client, app, monkeypatch):
    token = (await get_token(client))["access_token"]
    await cache_on(app)
    assert (await revoke(client, token)).status_code == 200
    lookups = count_lookups(app, monkeypatch)
    for _ in range(3):
        assert not await is_active(client, UNKNOWN)
        assert await phantom(client, token) == 401
    assert len(lookups) == 6 and len(app.state.iam.token.hot_cache) == 0


async def test_the_size_bound_holds(client, app):
    app.state.iam.token.hot_cache.max_entries = 3
    tokens = [(await get_token(client))["access_token"] for _ in range(5)]
    await cache_on(app)
    for token in tokens:
        assert await is_active(client, token)
    cache = app.state.iam.token.hot_cache
    assert len(cache) == 3
    assert [digest(t) in cache for t in tokens] == [False, False, True, True, True]
    assert all([await is_active(client, t) for t in tokens])  # evicted is not inactive: read again


async def test_with_the_cache_off_every_call_is_one_lookup(tmp_path, store_urls, monkeypatch):
    application = create_app(make_settings(tmp_path, store_urls, introspection_cache_seconds=0))
    async with application.router.lifespan_context(application):
        runtime = application.state.iam
        # On PostgreSQL the listener still runs (it carries client changes too), but never turns the cache on.
        if runtime.token.revocation_listener is not None:
            await runtime.token.revocation_listener.wait_connected(10)
        assert not runtime.token.hot_cache.enabled
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url=ISSUER) as http:
            token = (await get_token(http))["access_token"]
            lookups = count_lookups(application, monkeypatch)
            assert await is_active(http, token) and await phantom(http, token) == 200
            assert len(lookups) == 2


# -- replicas: PostgreSQL notifications ------------------------------------------------------------------
@pytest.fixture
def postgres_only(backend):
    if backend != "postgresql":
        pytest.skip("PostgreSQL only: replicas share its token store (SQLite is one process by construction)")


async def test_revocation_reaches_another_instance_at_once(postgres_only, settings, app, client, alice):
    b_app, b = second_instance(settings)
    async with b_app.router.lifespan_context(b_app), b:
        token = (await get_token(client))["access_token"]
        body = await tokens_for(client)
        for instance, http in ((app, client), (b_app, b)):
            await warm(instance, http, token)
            await warm(instance, http, body["access_token"])
        assert (await revoke(client, token)).status_code == 200  # through A
        await assert_inactive_everywhere(client, token)
        await eventually_inactive(b, token, within=1.0)
        assert digest(token) not in b_app.state.iam.token.hot_cache
        assert await is_active(b, body["access_token"])  # nothing else was evicted ...
        assert digest(body["access_token"]) in b_app.state.iam.token.hot_cache
        # ... until its grant is revoked (the refresh token, through A)
        assert (await revoke(client, body["refresh_token"], "webapp")).status_code == 200
        await eventually_inactive(b, body["access_token"], within=1.0)


async def test_without_its_listener_an_instance_bypasses_the_cache(postgres_only, settings, app, client,
                                                                   postgres_server):
    b_app, b = second_instance(settings)
    async with b_app.router.lifespan_context(b_app), b:
        listener = b_app.state.iam.token.revocation_listener
        cache = b_app.state.iam.token.hot_cache
        token = (await get_token(client))["access_token"]
        await warm(b_app, b, token)
        # Hold the reconnection until the test lets it through.
        gate = asyncio.Event()
        connect = listener._connect

        async def gated():
            await gate.wait()
            return await connect()

        listener._connect = gated
        first_pid = listener.pid
        admin = await asyncpg.connect(postgres_server + "/postgres")
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", first_pid)
        finally:
            await admin.close()
        await until(lambda: not cache.enabled, 1.0)  # the listener's connection closed: bypass from now on
        assert len(cache) == 0
        fresh = (await get_token(client))["access_token"]
        assert await is_active(b, fresh) and await phantom(b, fresh) == 200
        assert len(cache) == 0  # served from the store, not kept
        # A revocation B cannot hear about is seen by B at once anyway: it reads the store.
        assert (await revoke(client, fresh)).status_code == 200
        await assert_inactive_everywhere(b, fresh)
        assert await is_active(b, token)

        gate.set()
        await listener.wait_connected(5)
        assert listener.connections == 2 and listener.pid != first_pid and cache.enabled
        await warm(b_app, b, token)
        assert (await revoke(client, token)).status_code == 200
        await eventually_inactive(b, token, within=1.0)


def test_revocation_reaches_another_serve_process_at_once(postgres_only, tmp_path, postgres_server):
    """Two `iam serve` processes (replicas) on one PostgreSQL token database, forward-auth on both."""
    database = asyncio.run(create_database(postgres_server))
    url = f"postgresql+asyncpg://{postgres_server.split('://', 1)[1]}/{database}"

    async def listeners() -> int:
        conn = await asyncpg.connect(f"{postgres_server}/{database}")
        try:
            return await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
                database, RevocationListener.APPLICATION_NAME)
        finally:
            await conn.close()

    with ExitStack() as stack:
        bases = []
        for name in ("a", "b"):
            directory = tmp_path / name
            directory.mkdir()
            env = {**token_role_env(directory), "IAM_TOKEN_DATABASE_URL": url}
            bases.append(stack.enter_context(serve(env, directory))[0])
        a, b = (SimpleNamespace(base=base) for base in bases)
        deadline = time.monotonic() + 10
        while asyncio.run(listeners()) < 2:
            assert time.monotonic() < deadline, "the revocation listeners did not connect"
            time.sleep(0.05)

        def forward_auth(server, token) -> int:
            headers = {"Authorization": f"Bearer {token}"}
            return httpx.get(f"{server.base}/oauth/v2/phantom", headers=headers).status_code

        token = httpx.post(f"{a.base}/oauth/v2/token", data={"grant_type": "client_credentials"},
                           headers=basic("svc-basic")).json()["access_token"]
        for server in (a, b):
            assert [forward_auth(server, token) for _ in range(3)] == [200, 200, 200]  # warm
        revoked = httpx.post(f"{a.base}/oauth/v2/revoke", data={"token": token}, headers=basic("svc-basic"))
        assert revoked.status_code == 200
        assert forward_auth(a, token) == 401  # the revoking process: at once
        started = time.monotonic()
        while forward_auth(b, token) != 401:
            assert time.monotonic() - started < 1.0, "process B still accepts a revoked token after 1 s"
            time.sleep(0.02)
        introspected = httpx.post(f"{b.base}/oauth/v2/introspect", data={"token": token},
                                  headers=basic("svc-basic"))
        assert introspected.json() == {"active": False}


# -- the direct statements on PostgreSQL: failures fall back to SQLAlchemy -------------------------------
async def test_an_issuance_whose_answer_was_lost_is_stored_once(postgres_only, app, client, monkeypatch):
    from sqlalchemy import func, select

    from iam.token.store import _FAILED, access_tokens

    store = app.state.iam.token.store
    direct = store._on_driver

    async def answer_lost(statement, call):
        await direct(statement, call)  # the INSERT ran and committed ...
        return _FAILED  # ... but the connection broke before its answer arrived

    monkeypatch.setattr(store, "_on_driver", answer_lost)
    token = (await get_token(client))["access_token"]  # retried the SQLAlchemy way: no duplicate-key error
    monkeypatch.undo()
    assert await is_active(client, token)
    async with store.engine.connect() as conn:
        count = select(func.count()).select_from(access_tokens).where(access_tokens.c.digest == digest(token))
        assert (await conn.execute(count)).scalar() == 1


async def test_killed_pool_connections_cost_at_most_one_503(postgres_only, app, client, postgres_server):
    tokens = [(await get_token(client))["access_token"] for _ in range(3)]
    database = app.state.iam.stores["token"].url.database
    admin = await asyncpg.connect(postgres_server + "/postgres")
    try:  # every pooled connection of the token store (not the listener's)
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = $1 "
            "AND application_name <> $2", database, RevocationListener.APPLICATION_NAME)
        assert killed >= 1
    finally:
        await admin.close()
    statuses = [(await introspect(client, token)).status_code for token in tokens]
    assert statuses.count(503) <= 1 and statuses[-1] == 200, statuses
    assert await is_active(client, tokens[0]) and await phantom(client, tokens[1]) == 200


def test_expired_entries_are_swept_as_new_ones_come():
    cache = HotCache(5)
    for n in range(10):
        cache.put(*entry(n, until=100), cache.generation, now=0)
    for n in range(10, 20):  # each fill drops up to two expired entries from the least recently used end
        cache.put(*entry(n, until=200), cache.generation, now=150)
    assert len(cache) == 10 and all(entry(n)[0] in cache for n in range(10, 20))
    assert cache.sweep(now=300) == 10 and len(cache) == 0
