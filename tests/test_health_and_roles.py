"""Probes, and what each SERVICE_ROLE mounts and opens (docs/architecture.md)."""

import time

import asyncpg
import httpx
import pytest

from iam.app import create_app
from iam.roles import Role
from iam.store import Store
from tests.conftest import ISSUER, basic, make_settings
from tests.postgres import free_port

# The other roles' internal URLs; nothing listens there, and these tests make no cross-role call.
PEERS = {role: f"http://127.0.0.1:{free_port()}" for role in ("authentication", "token", "user_management")}
TOKEN_ROUTES = ["/oauth/v2/token", "/oauth/v2/introspect", "/oauth/v2/revoke"]


async def test_live_and_ready(client):
    assert (await client.get("/health/live")).json() == {"status": "ok"}
    ready = await client.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["status"] == "ok"


@pytest.mark.parametrize("role", ["authentication", "user-management"])
async def test_other_roles_do_not_mount_token_routes_or_open_its_store(tmp_path, role):
    unreachable = f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/none"
    own = "authn" if role == "authentication" else "users"
    stores = {"authn": unreachable, "token": unreachable, "users": unreachable, own: f"sqlite+aiosqlite:///{tmp_path}/{own}.db"}
    app = create_app(make_settings(tmp_path, stores, role=role, peers=PEERS))
    async with app.router.lifespan_context(app):
        assert list(app.state.iam.stores) == [own]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER) as http:
            assert (await http.get("/health/ready")).status_code == 200
            for path in TOKEN_ROUTES:
                assert (await http.post(path)).status_code == 404
            assert (await http.get("/.well-known/openid-configuration")).status_code == 404


async def test_token_role_opens_only_the_token_store(tmp_path):
    unreachable = f"postgresql+asyncpg://nobody@127.0.0.1:{free_port()}/none"
    stores = {"authn": unreachable, "users": unreachable, "token": f"sqlite+aiosqlite:///{tmp_path}/token.db"}
    app = create_app(make_settings(tmp_path, stores, role="token", peers=PEERS))
    async with app.router.lifespan_context(app):
        assert list(app.state.iam.stores) == ["token"]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER) as http:
            assert (await http.get("/health/ready")).status_code == 200
            token = await http.post("/oauth/v2/token", data={"grant_type": "client_credentials"}, headers=basic("svc-basic"))
            assert token.status_code == 200


def test_role_stores():
    assert Role.ALL.stores == ("authn", "token", "users")
    assert Role.TOKEN.stores == ("token",)


async def test_ready_is_503_behind_schema_until_migrated(tmp_path, empty_store_urls):
    app = create_app(make_settings(tmp_path, empty_store_urls, migrate_on_start=False))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER) as http:
            response = await http.get("/health/ready")
            assert response.status_code == 503
            assert "iam migrate" in " ".join(response.json()["problems"])
            assert (await http.get("/health/live")).status_code == 200
            for store in app.state.iam.stores.values():
                await store.migrate()
            assert (await http.get("/health/ready")).status_code == 200


async def test_store_outage_is_503_and_recovers_without_restart(tmp_path, postgres_server):
    """Readiness follows the store; a store outage is temporarily_unavailable, never invalid_client."""
    from tests.conftest import create_database

    name = await create_database(postgres_server)
    host = postgres_server.split("://", 1)[1]
    url = f"postgresql+asyncpg://{host}/{name}"
    app = create_app(make_settings(tmp_path, {"authn": url, "token": url, "users": url}, role="token", peers=PEERS))
    admin = await asyncpg.connect(postgres_server + "/postgres")
    try:
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER) as http:
                token = (await http.post(
                    "/oauth/v2/token", data={"grant_type": "client_credentials"}, headers=basic("svc-basic")
                )).json()["access_token"]
                await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
                await admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
                )
                assert (await http.get("/health/ready")).status_code == 503
                assert (await http.get("/health/live")).status_code == 200
                issued = await http.post(
                    "/oauth/v2/token", data={"grant_type": "client_credentials"}, headers=basic("svc-basic")
                )
                assert issued.status_code == 503 and issued.json()["error"] == "temporarily_unavailable"
                introspected = await http.post("/oauth/v2/introspect", data={"token": token}, headers=basic("svc-basic"))
                assert introspected.status_code == 503
                phantom = await http.get("/oauth/v2/phantom", headers={"Authorization": f"Bearer {token}"})
                assert phantom.status_code == 503

                await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
                assert (await http.get("/health/ready")).status_code == 200
                again = await http.post("/oauth/v2/introspect", data={"token": token}, headers=basic("svc-basic"))
                assert again.json()["active"] is True
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()


async def test_purge_deletes_only_expired_tokens_in_bounded_batches(client, app):
    from sqlalchemy import func, select, update

    from iam.token.access_tokens import digest
    from iam.token.store import access_tokens

    for _ in range(5):
        await client.post("/oauth/v2/token", data={"grant_type": "client_credentials"}, headers=basic("svc-basic"))
    live = (await client.post(
        "/oauth/v2/token", data={"grant_type": "client_credentials"}, headers=basic("svc-basic")
    )).json()["access_token"]
    store = app.state.iam.token.store
    async with store.engine.begin() as conn:
        await conn.execute(update(access_tokens).where(access_tokens.c.expires_at > 0).values(expires_at=10))
        await conn.execute(
            update(access_tokens).where(access_tokens.c.digest == digest(live))
            .values(expires_at=2**31 - 1)
        )
    assert await store.purge_expired(now=100, batch=2) == 2
    assert await store.purge_expired(now=100, batch=10) == 3
    assert await store.purge_expired(now=100, batch=10) == 0
    async with store.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(access_tokens))).scalar() == 1


async def test_purge_deletes_ended_sessions_and_stale_throttling_but_not_live_ones(app):
    """The authentication store does not grow without end: ended sessions and old counters go, live ones stay."""
    from sqlalchemy import func, select, update

    from iam.authn.store import login_failures, sessions

    iam = app.state.iam
    now = int(time.time())
    live, _ = await iam.authn.sessions.create("sub-live", ["pwd"])
    logged_out, _ = await iam.authn.sessions.create("sub-out", ["pwd"])
    await iam.authn.sessions.end(logged_out)
    idle, _ = await iam.authn.sessions.create("sub-idle", ["pwd"])
    expired, _ = await iam.authn.sessions.create("sub-expired", ["pwd"])
    async with iam.authn.store.engine.begin() as conn:
        await conn.execute(update(sessions).where(sessions.c.subject == "sub-idle")
                           .values(last_seen=now - iam.authn.sessions.idle_ttl - 1))
        await conn.execute(update(sessions).where(sessions.c.subject == "sub-expired").values(expires_at=now - 1))
    await iam.authn.throttle.fail(None, "192.0.2.1")
    for _ in range(5):
        await iam.authn.throttle.fail("locked", "192.0.2.2")  # the fifth locks the pair
    async with iam.authn.store.engine.begin() as conn:
        await conn.execute(update(login_failures).values(window_start=now - 3600))  # both windows are over

    assert await iam.authn.sessions.purge_ended(now, 10) == 3
    # the old counters (two addresses, the account's bucket, paid back); a lock in force is kept
    assert await iam.authn.throttle.purge_stale(now, 10) == 3
    assert await iam.purge(now) == 0  # what is left is live
    assert (await iam.authn.sessions.current(live)).subject == "sub-live"
    assert await iam.authn.throttle.check("locked", "192.0.2.2") > 0  # a lock in force is kept
    async with iam.authn.store.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(sessions))).scalar() == 1


def test_store_describe_hides_the_password():
    store = Store("token", "postgresql+asyncpg://iam:hunter2@db.internal/iam")
    assert "hunter2" not in store.describe


async def test_each_stores_migrations_build_exactly_its_tables(app):
    """The alembic trees and the tables the code declares agree: columns, types, nullability, indexes."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from iam.app import store_metadata

    # schema_compatibility is `iam migrate`'s own record next to alembic_version, in no tree.
    options = {"include_name": lambda table, kind, _parent: kind != "table" or table != "schema_compatibility"}
    for name, store in app.state.iam.stores.items():
        async with store.engine.connect() as conn:
            diff = await conn.run_sync(lambda sync, name=name: compare_metadata(
                MigrationContext.configure(sync, opts=options), store_metadata(name)))
        assert diff == [], (name, diff)
