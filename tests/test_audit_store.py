"""Audit events kept in the stores (`audit_store: true`): each in its role's store, never lost to a store
outage while the process runs, purged after the retention, listed by `iam audit list`."""

import json
import logging
import time

import httpx
import pytest
from sqlalchemy import insert, text

from iam.app import create_app
from iam.audit_store import AuditSink, recent
from iam.observability import AUDIT_DROPPED
from iam.users.store import audit_events
from tests.conftest import ISSUER, basic, make_settings
from tests.oauth import sign_in
from tests.server import iam, write_config
from tests.test_login import login_page


@pytest.fixture
async def audited(tmp_path, store_urls):
    app = create_app(make_settings(tmp_path, store_urls, audit_store=True, audit_retention_days=30))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER) as client:
            yield app, client


async def events(app, store: str, **query) -> list[dict]:
    return await recent(app.state.iam.stores[store], **query)


async def add_alice(app) -> str:
    from iam.users.directory import NewUser

    return await app.state.iam.users.directory.create_user(NewUser(user_name="alice"),
                                                             password="correct horse battery staple")


async def test_each_event_is_kept_in_the_store_of_its_role(audited):
    app, client = audited
    alice = await add_alice(app)
    await sign_in(client, await login_page(client))
    await client.post("/oauth/v2/token", data={"grant_type": "client_credentials"}, headers=basic("svc-basic"))
    await client.post("/oauth/v2/token", data={"grant_type": "client_credentials"}, headers=basic("svc-basic", "no"))
    assert await app.state.iam.audit_sink.flush() >= 4

    [created] = await events(app, "users", event="user.created")
    assert created["actor"] == alice and created["outcome"] == "success"
    [login] = await events(app, "authn", event="login.succeeded")
    assert login["actor"] == alice and login["client_id"] == "webapp" and login["details"]["amr"] == ["pwd"]
    assert login["source"]  # the client address
    [issued] = await events(app, "token", event="token.issued")
    assert issued["client_id"] == "svc-basic"
    [failed] = await events(app, "token", event="client.auth_failed")
    assert failed["outcome"] == "failure"
    assert await events(app, "token", event="login.succeeded") == []  # each event is kept once
    assert [e["event"] for e in await events(app, "authn", actor=alice)] == ["login.succeeded"]


async def test_events_wait_while_a_store_refuses_them_and_are_written_after(audited):
    app, client = audited
    store = app.state.iam.stores["token"]
    async with store.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE audit_events RENAME TO audit_events_away"))
    await client.post("/oauth/v2/token", data={"grant_type": "client_credentials"}, headers=basic("svc-basic"))
    assert await app.state.iam.audit_sink.flush() == 0  # refused: kept in the queue, the request was not hurt
    async with store.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE audit_events_away RENAME TO audit_events"))
    assert await app.state.iam.audit_sink.flush() == 1
    assert len(await events(app, "token", event="token.issued")) == 1


def test_an_event_of_a_role_running_elsewhere_goes_to_this_processs_store():
    sink = AuditSink({"users": None})  # the user-management role alone
    assert sink.store_for("user.created") == "users"
    assert sink.store_for("login.succeeded") == "users" and sink.store_for("mfa.reset") == "users"
    assert AuditSink({"authn": None, "token": None, "users": None}).store_for("mfa.reset") == "authn"


def test_a_full_queue_drops_the_oldest_and_counts_them():
    sink = AuditSink({"token": None}, capacity=3)
    before = AUDIT_DROPPED._value.get()
    for n in range(5):
        record = logging.LogRecord("iam.audit", logging.INFO, __file__, 0, "token.issued", (), None)
        record.audit = {"event": "token.issued", "outcome": "success", "details": {"n": n}}
        sink.emit(record)
    assert [json.loads(row["details"])["n"] for row in sink.queue] == [2, 3, 4]
    assert AUDIT_DROPPED._value.get() - before == 2


async def test_events_older_than_the_retention_are_purged(audited):
    app, _ = audited
    await add_alice(app)
    await app.state.iam.audit_sink.flush()
    store = app.state.iam.stores["users"]
    old = (int(time.time()) - 31 * 86400) * 1000
    async with store.engine.begin() as conn:
        await conn.execute(insert(audit_events), [{"at": old, "event": "user.changed", "outcome": "success",
                                                   "details": "{}"}])
    assert len(await events(app, "users")) == 2
    await app.state.iam.purge(int(time.time()))
    assert [e["event"] for e in await events(app, "users")] == ["user.created"]


def test_iam_audit_list_prints_what_an_operator_command_did(tmp_path):
    stores = {name: f"sqlite+aiosqlite:///{tmp_path}/{name}.db" for name in ("authn", "token", "users")}
    config = write_config(tmp_path, stores=stores, keys={"dir": str(tmp_path / "keys")}, audit_store=True)
    env = {"IAM_CONFIG": str(config)}
    added = iam("users", "add", "--username", "grace", "--password-stdin", env=env, cwd=tmp_path,
                input="a long enough password\n")
    assert added.returncode == 0, added.stderr
    assert iam("users", "disable", "grace", env=env, cwd=tmp_path).returncode == 0

    listed = iam("audit", "list", env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    lines = [json.loads(line) for line in listed.stdout.splitlines()]
    assert [line["audit"]["event"] for line in lines] == ["user.disabled", "user.created"]  # newest first
    created = [line for line in lines if line["audit"]["event"] == "user.created"]
    assert len(created) == 1 and created[0]["audit"]["actor"] == added.stdout.strip()
    assert created[0]["audit"]["schema"] == 1 and created[0]["time"].endswith("+00:00")

    only = iam("audit", "list", "--event", "user.created", "--since", "2000-01-01", env=env, cwd=tmp_path)
    assert [json.loads(line)["audit"]["event"] for line in only.stdout.splitlines()] == ["user.created"]
    future = iam("audit", "list", "--since", "2999-01-01T00:00:00Z", env=env, cwd=tmp_path)
    assert future.returncode == 0 and future.stdout == ""
    bad = iam("audit", "list", "--since", "yesterday", env=env, cwd=tmp_path)
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr
