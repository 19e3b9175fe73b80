"""The client administration API (/admin/v1/clients, iam/token/admin.py) over stored clients: create, read, list,
replace, patch, delete, rotate the secret; ETags, scopes, audit events; what a refusal answers and that it stores
nothing; a disabled or deleted client's tokens stop working. One app per backend for the module."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import func, insert, select

from iam.app import create_app
from iam.store import Store
from iam.token.store import ClientRows
from iam.token.store import clients as clients_table
from tests.conftest import ISSUER, basic, client_config, make_settings

pytest_plugins = ("tests.scim_support",)  # its `scim_stores`: fresh stores per backend for this module

ADMIN_SECRETS = {"clients-admin": "clients-admin-secret-0123456789", "clients-reader": "clients-reader-secret-01234"}
ADMIN_SCOPES = {"clients-admin": "clients:read clients:write", "clients-reader": "clients:read"}
SERVICE = {"grant_types": ["client_credentials"], "scope": "api:read"}  # a confidential machine client
WEB = {"redirect_uris": ["https://rp.test/cb"], "grant_types": ["authorization_code", "refresh_token"],
       "scope": "openid", "client_name": "RP"}


def admin_clients() -> list[dict]:
    return [{"client_id": cid, "client_secret": ADMIN_SECRETS[cid], "grant_types": ["client_credentials"],
             "scope": ADMIN_SCOPES[cid]} for cid in ADMIN_SECRETS]


@pytest.fixture(scope="module")
async def app(scim_stores, tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("admin"), scim_stores,
                             clients=client_config() + admin_clients(), client_sync_interval=0.05)
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


class Admin:
    def __init__(self, http: httpx.AsyncClient, tokens: dict[str, str]) -> None:
        self.http = http
        self.tokens = tokens

    async def call(self, method: str, path: str, body=None, *, who: str | None = "clients-admin",
                   headers: dict | None = None) -> httpx.Response:
        sent = {"Authorization": f"Bearer {self.tokens[who]}"} if who else {}
        if body is not None:
            sent["Content-Type"] = "application/merge-patch+json" if method == "PATCH" else "application/json"
        return await self.http.request(method, f"/admin/v1{path}", content=None if body is None else json.dumps(body),
                                       headers={**sent, **(headers or {})})

    async def create(self, **metadata) -> dict:
        response = await self.call("POST", "/clients", metadata)
        assert response.status_code == 201, response.text
        return response.json()


@pytest.fixture(scope="module")
async def admin(app) -> AsyncIterator[Admin]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER) as http:
        tokens = {cid: await client_token(http, cid, ADMIN_SECRETS[cid]) for cid in ADMIN_SECRETS}
        yield Admin(http, tokens)


async def client_token(http: httpx.AsyncClient, client_id: str, secret: str) -> str:
    response = await http.post("/oauth/v2/token", data={"grant_type": "client_credentials"},
                               headers=basic(client_id, secret))
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


async def token_status(http: httpx.AsyncClient, client_id: str, secret: str) -> int:
    response = await http.post("/oauth/v2/token", data={"grant_type": "client_credentials"},
                               headers=basic(client_id, secret))
    return response.status_code


async def active(http: httpx.AsyncClient, token: str) -> bool:
    response = await http.post("/oauth/v2/introspect", data={"token": token}, headers=basic("svc-basic"))
    return response.json()["active"]


async def stored_rows(app) -> int:
    async with app.state.iam.stores["token"].engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(clients_table))).scalar_one()


def audited(caplog, event: str) -> list[dict]:
    return [r.audit for r in caplog.records if getattr(r, "audit", {}).get("event") == event]


# -- create, read, the secret shown once ------------------------------------------------------------------
async def test_a_created_client_gets_a_secret_once_and_works_at_once(admin, app, caplog):
    caplog.set_level("INFO", logger="iam.audit")
    created = await admin.create(**SERVICE, client_name="Reports")
    client_id, secret = created["client_id"], created["client_secret"]
    assert len(secret) >= 43 and created["client_secret_expires_at"] == 0 and created["source"] == "store"
    assert audited(caplog, "client.created")[-1]["actor"] == "clients-admin"
    assert audited(caplog, "client.created")[-1]["client_id"] == client_id

    token = await client_token(admin.http, client_id, secret)
    assert await active(admin.http, token)
    assert await token_status(admin.http, client_id, secret + "x") == 401

    read = await admin.call("GET", f"/clients/{client_id}")
    assert read.status_code == 200 and read.headers["etag"] == '"1"'
    assert "client_secret" not in read.json() and read.json()["client_name"] == "Reports"
    # Only its digest is stored.
    async with app.state.iam.stores["token"].engine.connect() as conn:
        row = (await conn.execute(select(clients_table).where(clients_table.c.client_id == client_id))).one()
    assert secret not in repr(tuple(row)) and secret.encode() not in row.secret_digest


async def test_a_client_id_may_be_chosen_and_a_public_client_has_no_secret(admin):
    created = await admin.create(client_id="chosen-spa", token_endpoint_auth_method="none", **WEB)
    assert created["client_id"] == "chosen-spa" and "client_secret" not in created


async def test_a_yaml_client_is_shown_read_only(admin):
    read = await admin.call("GET", "/clients/webapp")
    assert read.status_code == 200 and read.json()["source"] == "config" and "client_secret" not in read.json()
    assert "etag" not in read.headers
    for method, body in (("PUT", WEB), ("PATCH", {"client_name": "x"}), ("DELETE", None)):
        response = await admin.call(method, "/clients/webapp", body)
        assert response.status_code == 409, response.text
        assert response.json()["error"] == "read_only_client" and "configuration file" in response.json()[
            "error_description"]
    rotated = await admin.call("POST", "/clients/webapp/secret", {})
    assert rotated.status_code == 409


BAD = [
    ({**WEB, "redirect_uris": ["https://rp.test/cb#frag"]}, "invalid_redirect_uri", "redirect_uris: "),
    ({**WEB, "redirect_uris": ["http://rp.test/cb"]}, "invalid_redirect_uri", "loopback"),
    ({**WEB, "redirect_uris": ["https://*.rp.test/cb"]}, "invalid_redirect_uri", "wildcards"),
    ({**WEB, "redirect_uris": ["javascript:alert(1)"]}, "invalid_redirect_uri", "javascript"),
    ({**WEB, "post_logout_redirect_uris": ["https://rp.test/bye#x"]}, "invalid_redirect_uri", "post_logout"),
    ({**SERVICE, "grant_types": ["password"]}, "invalid_client_metadata", "grant_types.0"),
    ({**SERVICE, "token_endpoint_auth_method": "none"}, "invalid_client_metadata", "client_credentials"),
    ({**SERVICE, "colour": "blue"}, "invalid_client_metadata", "colour: is not a known"),
    ({**SERVICE, "client_id": "svc-basic"}, "invalid_client_metadata", "configuration file"),
    ({**SERVICE, "client_id": "clients-admin"}, "invalid_client_metadata", "configuration file"),
    ({**SERVICE, "client_secret": "mine-0123456789abcdef"}, "invalid_client_metadata", "issued by the server"),
    ({**SERVICE, "connectors": ["nowhere"]}, "invalid_client_metadata", "connector"),
    ({**SERVICE, "enabled": "no"}, "invalid_client_metadata", "enabled"),
    ([SERVICE], "invalid_client_metadata", "JSON object"),
]


@pytest.mark.parametrize(("body", "error", "said"), BAD)
async def test_bad_metadata_is_refused_the_rfc_7591_way_and_stores_nothing(admin, app, body, error, said):
    before = await stored_rows(app)
    response = await admin.call("POST", "/clients", body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == error and said in response.json()["error_description"], response.json()
    assert await stored_rows(app) == before


async def test_bad_changes_are_refused_and_change_nothing(admin):
    created = await admin.create(**WEB)
    path = f"/clients/{created['client_id']}"
    for method, body in (("PATCH", {"redirect_uris": ["https://rp.test/x#y"]}), ("PATCH", {"colour": 1}),
                         ("PUT", {**WEB, "grant_types": ["implicit"]}), ("PATCH", {"client_id": "other"})):
        response = await admin.call(method, path, body)
        assert response.status_code == 400, response.text
    after = await admin.call("GET", path)
    assert after.headers["etag"] == '"1"' and after.json()["redirect_uris"] == WEB["redirect_uris"]


async def test_scopes_and_bodies_are_checked(admin):
    assert (await admin.call("GET", "/clients", who=None)).status_code == 401
    assert (await admin.call("GET", "/clients", who="clients-reader")).status_code == 200
    refused = await admin.call("POST", "/clients", SERVICE, who="clients-reader")
    assert refused.status_code == 403 and "clients:write" in refused.headers["www-authenticate"]
    wrong_type = await admin.call("POST", "/clients", SERVICE, headers={"Content-Type": "text/plain"})
    assert wrong_type.status_code == 415
    not_json = await admin.call("POST", "/clients", None, headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400 or not_json.status_code == 201  # an empty body is {}: defaults
    assert (await admin.call("GET", "/clients/no-such-client")).status_code == 404


# -- changes, ETags -------------------------------------------------------------------------------------------
async def test_put_and_patch_change_the_client_and_its_etag(admin, caplog):
    caplog.set_level("INFO", logger="iam.audit")
    created = await admin.create(**WEB)
    path = f"/clients/{created['client_id']}"
    patched = await admin.call("PATCH", path, {"client_name": "Renamed", "scope": None}, headers={"If-Match": '"1"'})
    assert patched.status_code == 200 and patched.headers["etag"] == '"2"'
    assert patched.json()["client_name"] == "Renamed" and "scope" not in patched.json()  # null: back to default
    assert audited(caplog, "client.updated")[-1]["client_id"] == created["client_id"]
    weak = await admin.call("PATCH", path, {"client_name": "Weak"}, headers={"If-Match": 'W/"2"'})
    assert weak.status_code == 412  # RFC 9110 §13.1.1: If-Match compares strongly
    stale = await admin.call("PUT", path, {**WEB, "client_name": "Old"}, headers={"If-Match": '"1"'})
    assert stale.status_code == 412 and stale.json()["error"] == "precondition_failed"
    replaced = await admin.call("PUT", path, {**WEB, "client_name": "New"}, headers={"If-Match": '"2"'})
    assert replaced.status_code == 200 and replaced.json()["client_name"] == "New"
    stale_delete = await admin.call("DELETE", path, headers={"If-Match": '"2"'})
    assert stale_delete.status_code == 412
    assert (await admin.call("GET", path)).status_code == 200


async def test_concurrent_updates_of_one_client_one_wins_one_is_told_412(admin):
    created = await admin.create(**WEB)
    path = f"/clients/{created['client_id']}"
    answers = await asyncio.gather(*(admin.call("PATCH", path, {"client_name": name}, headers={"If-Match": '"1"'})
                                     for name in ("first", "second")))
    assert sorted(a.status_code for a in answers) == [200, 412]
    winner = next(a for a in answers if a.status_code == 200).json()["client_name"]
    assert (await admin.call("GET", path)).json()["client_name"] == winner


async def test_a_disabled_client_and_its_tokens_stop_working_at_once_and_come_back(admin):
    created = await admin.create(**SERVICE)
    client_id, secret = created["client_id"], created["client_secret"]
    token = await client_token(admin.http, client_id, secret)
    assert await active(admin.http, token)
    assert await active(admin.http, token)  # now from the hot cache, too
    disabled = await admin.call("PATCH", f"/clients/{client_id}", {"enabled": False})
    assert disabled.status_code == 200 and disabled.json()["enabled"] is False
    assert not await active(admin.http, token)
    phantom = await admin.http.get("/oauth/v2/phantom", headers={"Authorization": f"Bearer {token}"})
    assert phantom.status_code == 401
    assert await token_status(admin.http, client_id, secret) == 401
    await admin.call("PATCH", f"/clients/{client_id}", {"enabled": True})
    assert await active(admin.http, token) and await token_status(admin.http, client_id, secret) == 200


async def test_a_deleted_client_is_gone_with_its_tokens(admin, caplog):
    caplog.set_level("INFO", logger="iam.audit")
    created = await admin.create(**SERVICE)
    client_id, secret = created["client_id"], created["client_secret"]
    token = await client_token(admin.http, client_id, secret)
    assert await active(admin.http, token)
    deleted = await admin.call("DELETE", f"/clients/{client_id}", headers={"If-Match": '"1"'})
    assert deleted.status_code == 204
    assert audited(caplog, "client.deleted")[-1]["client_id"] == client_id
    assert not await active(admin.http, token)
    assert await token_status(admin.http, client_id, secret) == 401
    assert (await admin.call("GET", f"/clients/{client_id}")).status_code == 404
    assert (await admin.call("DELETE", f"/clients/{client_id}")).status_code == 404


async def test_another_processs_delete_and_create_between_two_checks_are_both_seen(admin, app, scim_stores):
    """Another writer on the store (`iam clients`, a second process on one SQLite file) deletes one client and
    creates another with the same version: the count and the sum of versions are as before, and still the running
    server drops the first and serves the second (ClientRows.fingerprint)."""
    created = await admin.create(**SERVICE)
    gone, secret = created["client_id"], created["client_secret"]
    assert await token_status(admin.http, gone, secret) == 200
    # The sync's fingerprint taken now, after this process's own create: from here only the other process's two
    # changes differ from it (else the create alone would trigger the next full reload, and hide a miss).
    await app.state.iam.token.client_sync.resync()
    other = Store("token", scim_stores["token"])
    try:
        rows = ClientRows(other.engine)
        row = await rows.get(gone)
        assert row is not None and row["version"] == 1
        assert await rows.delete(gone, 1)
        await rows.insert({**row, "client_id": "came-" + gone})
    finally:
        await other.close()
    deadline = time.monotonic() + 10  # each change is seen by itself on PostgreSQL (a notice each), together on SQLite
    while (await token_status(admin.http, gone, secret), await token_status(admin.http, "came-" + gone, secret)) \
            != (401, 200):
        assert time.monotonic() < deadline, "the running server missed another process's delete or create"
        await asyncio.sleep(0.02)


async def test_a_full_reload_reparses_only_changed_rows_and_still_sees_a_same_version_rewrite(admin, app,
                                                                                             scim_stores):
    """StoredClients.all keeps what it parsed while a row is exactly as it was read: unchanged clients come back as
    the same objects (the registry keeps them as they are). A row another writer replaced with other metadata at
    the same version (delete, then create the same id) is still read afresh, and a deleted one dropped."""
    token = app.state.iam.token
    kept, rewritten, dropped = [await admin.create(**SERVICE) for _ in range(3)]
    await token.client_sync.resync()
    before = {stored.client_id: stored for stored in await token.stored_clients.all()}
    other = Store("token", scim_stores["token"])
    try:
        rows = ClientRows(other.engine)
        row = await rows.get(rewritten["client_id"])
        assert row is not None and row["version"] == 1
        assert await rows.delete(rewritten["client_id"], 1)
        metadata = {**json.loads(row["metadata"]), "scope": "api:read api:write"}
        await rows.insert({**row, "metadata": json.dumps(metadata)})  # version 1 again, other content
        assert await rows.delete(dropped["client_id"], 1)
    finally:
        await other.close()
    await token.client_sync.resync()
    after = {stored.client_id: stored for stored in await token.stored_clients.all()}
    assert after[kept["client_id"]] is before[kept["client_id"]]
    assert after[rewritten["client_id"]].config.scopes == {"api:read", "api:write"}
    assert dropped["client_id"] not in after
    widened = await admin.http.post("/oauth/v2/token", data={"grant_type": "client_credentials", "scope": "api:write"},
                                    headers=basic(rewritten["client_id"], rewritten["client_secret"]))
    assert widened.status_code == 200, widened.text
    assert await token_status(admin.http, dropped["client_id"], dropped["client_secret"]) == 401
    assert await token_status(admin.http, kept["client_id"], kept["client_secret"]) == 200


async def test_a_row_this_release_cannot_read_is_not_served_and_every_other_client_still_is(admin, app, caplog):
    """A newer release (a rolling upgrade, a rollback) stores a client with a key this one does not know: that client
    fails closed, alone; the reload, readiness and every other client go on. The API shows it with the reason,
    refuses what needs its metadata (409, nothing changed) and may replace or delete it."""
    token = app.state.iam.token
    newer, gone, other = [await admin.create(**SERVICE) for _ in range(3)]
    client_id, secret = newer["client_id"], newer["client_secret"]
    async with app.state.iam.stores["token"].engine.begin() as conn:
        for written in (client_id, gone["client_id"]):
            metadata = json.loads((await conn.execute(select(clients_table.c.metadata).where(
                clients_table.c.client_id == written))).scalar_one())
            await conn.execute(clients_table.update().where(clients_table.c.client_id == written).values(
                metadata=json.dumps({**metadata, "policy_uri": "https://rp.example/privacy"})))
    caplog.set_level("WARNING", logger="iam.token.clients")
    for _ in range(2):
        await token.client_sync.resync()
    assert [r.getMessage() for r in caplog.records if client_id in r.getMessage()] == [
        f"stored client {client_id} is not served: this release cannot read it "
        "(policy_uri: Extra inputs are not permitted)"]  # once: an unchanged row is not read again
    assert await token_status(admin.http, client_id, secret) == 401
    assert await token_status(admin.http, other["client_id"], other["client_secret"]) == 200
    assert (await admin.http.get("/health/ready")).status_code == 200

    shown = await admin.call("GET", f"/clients/{client_id}")
    assert shown.status_code == 200 and "policy_uri" in shown.json()["unreadable"] and shown.headers["etag"] == '"1"'
    listed = (await admin.call("GET", f"/clients?after={client_id[:-1]}&limit=1000")).json()["clients"]
    assert next(c for c in listed if c["client_id"] == client_id)["unreadable"] == shown.json()["unreadable"]
    for method, path, body in (("PATCH", "", {"client_name": "x"}), ("POST", "/secret", {"grace": 0})):
        refused = await admin.call(method, f"/clients/{client_id}{path}", body)
        assert refused.status_code == 409 and refused.json()["error"] == "unreadable_client", refused.text
    assert (await admin.call("GET", f"/clients/{client_id}")).headers["etag"] == '"1"'  # nothing changed

    mended = await admin.call("PUT", f"/clients/{client_id}", {"client_id": client_id, **SERVICE},
                              headers={"If-Match": '"1"'})
    assert mended.status_code == 200 and "unreadable" not in mended.json()
    assert await token_status(admin.http, client_id, secret) == 200  # the same secret, served again
    assert (await admin.call("DELETE", f"/clients/{gone['client_id']}")).status_code == 204
    assert (await admin.call("GET", f"/clients/{gone['client_id']}")).status_code == 404

async def test_a_full_reload_that_read_the_store_before_a_change_does_not_undo_it(admin, app, monkeypatch):
    """A full reload (a listener reconnect, another process's change) reads every client, and meanwhile this
    process creates one: the create is answered only once the registry has it, and the older read, applied
    afterwards, does not drop it again (ClientSync: one queue for every reload)."""
    token = app.state.iam.token
    read, go_on = asyncio.Event(), asyncio.Event()
    every, before = token.stored_clients.all, await token.stored_clients.fingerprint()

    async def slow_all():
        rows = await every()
        read.set()
        await go_on.wait()
        return rows

    async def unchanged():  # the regular check must not mend what the reload got wrong: it runs seconds apart
        return before

    monkeypatch.setattr(token.stored_clients, "all", slow_all)
    monkeypatch.setattr(token.stored_clients, "fingerprint", unchanged)
    reload = asyncio.create_task(token.client_sync.resync())
    await asyncio.wait_for(read.wait(), 5)
    create = asyncio.create_task(admin.create(**SERVICE))
    await asyncio.sleep(0.2)  # the row is committed by now; the answer waits behind the reload
    assert not create.done()
    go_on.set()
    await asyncio.wait_for(reload, 5)
    created = await asyncio.wait_for(create, 5)
    assert await token_status(admin.http, created["client_id"], created["client_secret"]) == 200


async def test_a_refresh_token_of_a_disabled_client_is_refused(admin, app):
    from tests.conftest import PASSWORD  # noqa: F401 - the people fixtures live with the code-grant tests

    created = await admin.create(**WEB)
    client_id = created["client_id"]
    await admin.call("PATCH", f"/clients/{client_id}", {"enabled": False})
    refused = await admin.http.post("/oauth/v2/token", data={"grant_type": "refresh_token", "refresh_token": "x"},
                                    headers=basic(client_id, created["client_secret"]))
    assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"


# -- rotation -------------------------------------------------------------------------------------------------
async def test_a_rotated_secret_overlaps_for_the_grace_period_then_the_old_one_stops(admin, app, caplog):
    caplog.set_level("INFO", logger="iam.audit")
    created = await admin.create(**SERVICE)
    client_id, old = created["client_id"], created["client_secret"]
    rotated = await admin.call("POST", f"/clients/{client_id}/secret", {"grace": 3600})
    assert rotated.status_code == 200, rotated.text
    new = rotated.json()["client_secret"]
    assert new != old and rotated.json()["previous_secret_expires_at"] >= int(time.time()) + 3590
    assert audited(caplog, "client.secret_rotated")[-1]["client_id"] == client_id
    assert await token_status(admin.http, client_id, new) == 200
    assert await token_status(admin.http, client_id, old) == 200  # the grace period
    registry = app.state.iam.token.clients
    clock = registry._clock
    registry._clock = lambda: clock() + 3601  # past the grace period
    try:
        assert await token_status(admin.http, client_id, old) == 401
        assert await token_status(admin.http, client_id, new) == 200
    finally:
        registry._clock = clock
    again = await admin.call("POST", f"/clients/{client_id}/secret", {"grace": 0})
    assert await token_status(admin.http, client_id, again.json()["client_secret"]) == 200
    assert await token_status(admin.http, client_id, new) == 401  # no grace: stops at once


async def test_the_default_grace_is_the_setting_and_bad_grace_or_a_public_client_are_refused(admin, app):
    created = await admin.create(**SERVICE)
    rotated = await admin.call("POST", f"/clients/{created['client_id']}/secret")
    grace = app.state.iam.settings.client_secret_grace
    assert rotated.status_code == 200 and rotated.json()["previous_secret_expires_at"] >= int(time.time()) + grace - 10
    for bad in ({"grace": -1}, {"grace": "soon"}, {"grace": True}):
        assert (await admin.call("POST", f"/clients/{created['client_id']}/secret", bad)).status_code == 400
    public = await admin.create(token_endpoint_auth_method="none", **WEB)
    refused = await admin.call("POST", f"/clients/{public['client_id']}/secret", {})
    assert refused.status_code == 400 and "no secret" in refused.json()["error_description"]



async def test_a_rotation_with_a_stale_if_match_is_refused_and_changes_nothing(admin):
    """Two operators rotate at once: the second, holding the ETag both read, gets 412 instead of cutting off at
    once the secret the first left working for its grace."""
    created = await admin.create(**SERVICE)
    client_id, old = created["client_id"], created["client_secret"]
    etag = (await admin.call("GET", f"/clients/{client_id}")).headers["etag"]
    first = await admin.call("POST", f"/clients/{client_id}/secret", {"grace": 3600}, headers={"If-Match": etag})
    assert first.status_code == 200 and first.headers["etag"] != etag
    second = await admin.call("POST", f"/clients/{client_id}/secret", {"grace": 3600}, headers={"If-Match": etag})
    assert second.status_code == 412 and second.json()["error"] == "precondition_failed"
    assert await token_status(admin.http, client_id, old) == 200  # still in the first rotation's grace
    assert await token_status(admin.http, client_id, first.json()["client_secret"]) == 200
    assert (await admin.call("GET", f"/clients/{client_id}")).headers["etag"] == first.headers["etag"]


@pytest.mark.parametrize("client_id", ["team/reports", "team/secret", "a/b/c"])
async def test_a_client_id_with_a_slash_is_read_changed_rotated_and_deleted(admin, client_id):
    """RFC 6749 App. A.1 allows `/` in a client_id; the admin API addresses it percent-encoded or not."""
    from urllib.parse import quote

    created = await admin.create(client_id=client_id, **SERVICE)
    encoded = quote(client_id, safe="")
    for path in (f"/clients/{encoded}", f"/clients/{client_id}"):
        read = await admin.call("GET", path)
        assert read.status_code == 200 and read.json()["client_id"] == client_id
    patched = await admin.call("PATCH", f"/clients/{encoded}", {"client_name": "Team reports"})
    assert patched.status_code == 200 and patched.json()["client_name"] == "Team reports"
    rotated = await admin.call("POST", f"/clients/{encoded}/secret", {"grace": 0})
    assert rotated.status_code == 200 and rotated.json()["client_id"] == client_id
    assert await token_status(admin.http, client_id, rotated.json()["client_secret"]) == 200
    assert await token_status(admin.http, client_id, created["client_secret"]) == 401
    assert (await admin.call("DELETE", f"/clients/{encoded}")).status_code == 204
    assert (await admin.call("GET", f"/clients/{encoded}")).status_code == 404
    assert await token_status(admin.http, client_id, rotated.json()["client_secret"]) == 401


async def test_the_internal_api_addresses_a_client_id_with_a_slash(admin, app):
    """The account page of a separate authentication role removes a person's access to such a client through
    the token role's internal API (RemoteTokens percent-encodes the segment; the route must still match)."""
    from iam.peers import RemoteTokens, ServiceIdentity
    from iam.roles import Role

    remote = RemoteTokens(admin.http, ISSUER, ServiceIdentity(Role.AUTHENTICATION, app.state.iam.keys), Role.TOKEN)
    assert await remote.remove("someone", "team/reports") == 0  # no grant to end; before: 404, PeerUnavailable

# -- listing --------------------------------------------------------------------------------------------------
async def test_ten_thousand_clients_are_listed_page_by_page(admin, app):
    now = int(time.time())
    metadata = json.dumps({"grant_types": ["client_credentials"]})
    rows = [{"client_id": f"bulk-{i:05d}", "metadata": metadata, "enabled": True, "version": 1, "created_at": now,
             "updated_at": now} for i in range(10_000)]
    async with app.state.iam.stores["token"].engine.begin() as conn:
        await conn.execute(insert(clients_table), rows)
    seen: list[str] = []
    after = "bulk-"
    pages = 0
    while after is not None:
        response = await admin.call("GET", f"/clients?after={after}&limit=1000")
        assert response.status_code == 200
        body = response.json()
        seen += [c["client_id"] for c in body["clients"] if c["client_id"].startswith("bulk-")]
        after = body["next"]
        pages += 1
    assert seen == [row["client_id"] for row in rows] and pages >= 10
    assert (await admin.call("GET", "/clients?limit=1001")).status_code == 400
    assert (await admin.call("GET", "/clients?limit=0")).status_code == 400


# -- the API's description ------------------------------------------------------------------------------------
async def test_the_openapi_description_names_every_operation(admin):
    response = await admin.call("GET", "/openapi.json", who="clients-reader")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert set(paths["/admin/v1/clients"]) == {"get", "post"}
    assert set(paths["/admin/v1/clients/{client_id}"]) == {"get", "put", "patch", "delete"}
    assert set(paths["/admin/v1/clients/{client_id}/secret"]) == {"post"}
    assert "412" in paths["/admin/v1/clients/{client_id}"]["put"]["responses"]
    assert set(paths["/admin/v1/initial-access-tokens"]) == {"get", "post"}
    assert set(paths["/admin/v1/initial-access-tokens/{token_id}"]) == {"delete"}
    issue = paths["/admin/v1/initial-access-tokens"]["post"]
    assert set(issue["requestBody"]["content"]["application/json"]["schema"]["properties"]) == {
        "grant_types", "redirect_uri_patterns", "scope", "token_endpoint_auth_methods", "uses", "ttl"}
    assert (await admin.call("GET", "/openapi.json", who=None)).status_code == 401


async def test_a_stored_client_is_named_on_the_sign_in_page(admin):
    from tests.oauth import authorize, pkce

    created = await admin.create(token_endpoint_auth_method="none", **{**WEB, "client_name": "Stored RP"})
    _, challenge = pkce()
    start = await authorize(admin.http, created["client_id"], WEB["redirect_uris"][0], "openid", challenge)
    assert start.status_code in (302, 303), start.text
    page = await admin.http.get(start.headers["location"])
    assert page.status_code == 200 and "to continue to <strong>Stored RP</strong>" in page.text
