"""Dynamic client registration (RFC 7591) and its management (RFC 7592), iam/token/registration.py: initial access
tokens and their policies, the allow-list of registrable metadata, RFC 7592 read / replace / delete, software
statements, the rate limit per initial access token, discovery; what every refusal answers and that it stores
nothing. One app per backend for the module (registration on), as in tests/test_admin_clients.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from joserfc import jwt
from joserfc.jwk import ECKey
from sqlalchemy import func, select, update

from iam.app import create_app
from iam.token.registration import REGISTRABLE
from iam.token.store import clients as clients_table
from iam.token.store import initial_access_tokens
from tests.conftest import ISSUER, SECRETS, client_config, make_settings
from tests.postgres import free_port
from tests.test_admin_clients import ADMIN_SECRETS, active, admin_clients, audited, client_token, token_status

pytest_plugins = ("tests.scim_support",)  # its `scim_stores`: fresh stores per backend for this module

RATE_LIMIT = 5
VENDOR = "https://vendor.test"
VENDOR_KEY = ECKey.generate_key("P-256", parameters={"kid": "vendor-1"}, private=True)
STRANGER_KEY = ECKey.generate_key("P-256", parameters={"kid": "vendor-1"}, private=True)  # same kid, other key
SERVICE = {"grant_types": ["client_credentials"], "scope": "api:read"}
WEB = {"redirect_uris": ["https://rp.test/cb"], "grant_types": ["authorization_code", "refresh_token"],
       "scope": "openid", "client_name": "RP"}
MACHINE_POLICY = {"grant_types": ["client_credentials"], "scope": "api:read"}


def registration_settings(**overrides) -> dict:
    return {"enabled": True, "rate_limit": RATE_LIMIT, "software_statement_issuers": [
        {"issuer": VENDOR, "jwks": {"keys": [VENDOR_KEY.as_dict(private=False)]}}], **overrides}


@pytest.fixture(scope="module")
async def app(scim_stores, tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("registration"), scim_stores,
                             clients=client_config() + admin_clients(), registration=registration_settings())
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


class Registrar:
    """Initial access tokens from the administration API, and calls of the registration endpoints."""

    def __init__(self, http: httpx.AsyncClient, admin_token: str) -> None:
        self.http = http
        self.admin = {"Authorization": f"Bearer {admin_token}"}

    async def initial_token(self, **request) -> tuple[str, dict]:
        response = await self.http.post("/admin/v1/initial-access-tokens", json=request, headers=self.admin)
        assert response.status_code == 201, response.text
        body = response.json()
        return body["token"], body

    async def register(self, token: str | None, body=None, *, content: bytes | None = None,
                       content_type: str = "application/json") -> httpx.Response:
        headers = {"Content-Type": content_type}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return await self.http.post("/oauth/v2/register", content=json.dumps(body).encode() if content is None
                                    else content, headers=headers)

    async def registered(self, token: str | None = None, **metadata) -> dict:
        if token is None:
            token, _ = await self.initial_token(**MACHINE_POLICY)
        response = await self.register(token, metadata)
        assert response.status_code == 201, response.text
        return response.json()

    async def manage(self, method: str, client_id: str, access_token: str, body=None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {access_token}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        return await self.http.request(method, f"/oauth/v2/register/{client_id}", headers=headers,
                                       content=None if body is None else json.dumps(body).encode())


@pytest.fixture(scope="module")
async def registrar(app):
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=ISSUER) as http:
        yield Registrar(http, await client_token(http, "clients-admin", ADMIN_SECRETS["clients-admin"]))


async def client_count(app) -> int:
    async with app.state.iam.stores["token"].engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(clients_table))).scalar_one()


async def uses_left(app, token_id: str) -> int | None:
    async with app.state.iam.stores["token"].engine.connect() as conn:
        return (await conn.execute(select(initial_access_tokens.c.uses_left)
                                   .where(initial_access_tokens.c.id == token_id))).scalar_one()


def refused_bearer(response: httpx.Response) -> None:
    """RFC 6750 §3 / RFC 7591 §3: 401 invalid_token."""
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "invalid_token"
    assert 'error="invalid_token"' in response.headers["www-authenticate"]


def statement(claims: dict, key=VENDOR_KEY, alg: str = "ES256") -> str:
    return jwt.encode({"alg": alg, "kid": "vendor-1"}, {"iss": VENDOR, "iat": int(time.time()), **claims}, key)


# -- the happy path, end to end -------------------------------------------------------------------------------
async def test_a_registered_client_works_is_managed_and_its_tokens_end_with_it(registrar, app, caplog):
    caplog.set_level("INFO", logger="iam.audit")
    initial, issued = await registrar.initial_token(**MACHINE_POLICY)
    response = await registrar.register(initial, {**SERVICE, "client_name": "Reports", "software_id": "r-1"})
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    client_id, secret, access = body["client_id"], body["client_secret"], body["registration_access_token"]
    assert body["client_secret_expires_at"] == 0 and abs(body["client_id_issued_at"] - time.time()) < 60
    assert body["registration_client_uri"] == f"{ISSUER}/oauth/v2/register/{client_id}"
    assert body["grant_types"] == ["client_credentials"] and body["scope"] == "api:read"
    assert body["token_endpoint_auth_method"] == "client_secret_basic" and body["client_name"] == "Reports"
    assert "software_id" not in body  # RFC 7591 §2: unknown to this server, ignored
    assert audited(caplog, "client.registered")[-1]["actor"] == f"initial-token:{issued['id']}"
    assert app.state.iam.token.clients.get(client_id).require_consent  # RFC 9700 §4.11.2

    token = await client_token(registrar.http, client_id, secret)
    assert await active(registrar.http, token)

    read = await registrar.manage("GET", client_id, access)
    assert read.status_code == 200 and read.headers["cache-control"] == "no-store"
    assert "client_secret" not in read.json() and read.json()["client_name"] == "Reports"
    assert read.json()["registration_client_uri"] == body["registration_client_uri"]

    replaced = await registrar.manage("PUT", client_id, access, {**SERVICE, "client_id": client_id,
                                                                 "client_name": "Monthly reports"})
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["client_name"] == "Monthly reports"
    assert audited(caplog, "client.updated")[-1]["actor"] == f"registration:{client_id}"
    assert await token_status(registrar.http, client_id, secret) == 200  # the same secret

    deleted = await registrar.manage("DELETE", client_id, access)
    assert deleted.status_code == 204
    assert audited(caplog, "client.deleted")[-1]["actor"] == f"registration:{client_id}"
    assert not await active(registrar.http, token)
    assert await token_status(registrar.http, client_id, secret) == 401
    refused_bearer(await registrar.manage("GET", client_id, access))  # RFC 7592 §2.3: gone, says nothing more


async def test_a_registered_client_gets_a_code_only_once_the_person_consents(registrar, client, alice):
    from tests.oauth import authorize, follow, hidden_fields, pkce, query, redeem, sign_in

    callback = WEB["redirect_uris"][0]
    registered = await registrar.registered((await registrar.initial_token())[0], **{
        **WEB, "client_name": "Registered RP", "token_endpoint_auth_method": "none"})
    client_id = registered["client_id"]
    verifier, challenge = pkce()
    page = await follow(client, await authorize(client, client_id, callback, "openid", challenge), callback)
    page = await follow(client, await sign_in(client, page), callback)
    assert page.status_code == 200 and "Allow Registered RP?" in page.text  # RFC 9700 §4.11.2
    allowed = await client.post("/authn/consent", data={**hidden_fields(page.text), "decision": "allow"})
    done = await follow(client, allowed, callback)
    tokens = await redeem(client, query(done.headers["location"])["code"], verifier, client_id, callback)
    assert tokens.status_code == 200, tokens.text


async def test_a_web_client_is_registered_with_what_it_may_choose_and_nothing_more(registrar, app):
    initial, _ = await registrar.initial_token(redirect_uri_patterns=["https://*.apps.test/cb"])
    privileged = {"introspection": True, "access_token_ttl": 86400, "require_pkce": False, "require_consent": False,
                  "audience": ["https://api.test"], "connectors": [], "refresh_reuse_window": 60,
                  "require_pushed_authorization_requests": True, "token_exchange": {"audiences": ["x"]}}
    response = await registrar.register(initial, {**WEB, "redirect_uris": ["https://shop.apps.test/cb"],
                                                  "client_id": "svc-basic", **privileged})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["client_id"] != "svc-basic" and body["redirect_uris"] == ["https://shop.apps.test/cb"]
    assert not set(privileged) & set(body)  # RFC 7591 §3.2.1: the answer tells what was registered
    config = app.state.iam.token.clients.get(body["client_id"])
    assert config.require_consent and config.require_pkce and not config.introspection
    assert config.access_token_ttl == 3600 and config.audience == [] and config.refresh_reuse_window == 0
    assert await token_status(registrar.http, "svc-basic", SECRETS["svc-basic"]) == 200  # the YAML client is untouched


async def test_neither_token_is_stored_in_clear(registrar, app):
    initial, issued = await registrar.initial_token(**MACHINE_POLICY, uses=2)
    body = await registrar.registered(initial, **SERVICE)
    async with app.state.iam.stores["token"].engine.connect() as conn:
        client_row = (await conn.execute(select(clients_table)
                                         .where(clients_table.c.client_id == body["client_id"]))).one()
        token_row = (await conn.execute(select(initial_access_tokens)
                                        .where(initial_access_tokens.c.id == issued["id"]))).one()
    for value in (initial, body["registration_access_token"], body["client_secret"]):
        for row in (client_row, token_row):
            assert value not in repr(tuple(row)) and value.encode() not in b"".join(
                cell for cell in row if isinstance(cell, bytes))
    assert client_row.initial_token_id == issued["id"] and json.loads(client_row.registration_policy)[
        "grant_types"] == ["client_credentials"]
    assert token_row.uses_left == 1


# -- refusals: RFC 7591 §3.2.2 bodies, nothing stored ----------------------------------------------------------
BAD = [
    ({}, {**WEB, "redirect_uris": ["https://rp.test/cb#frag"]}, "invalid_redirect_uri"),
    ({}, {**WEB, "redirect_uris": ["http://rp.test/cb"]}, "invalid_redirect_uri"),
    ({}, {**WEB, "redirect_uris": ["https://*.rp.test/cb"]}, "invalid_redirect_uri"),
    ({}, {**WEB, "redirect_uris": ["javascript:alert(1)"]}, "invalid_redirect_uri"),
    ({}, {**WEB, "post_logout_redirect_uris": ["https://rp.test/bye#x"]}, "invalid_redirect_uri"),
    ({}, {**WEB, "grant_types": ["password"]}, "invalid_client_metadata"),
    ({"grant_types": ["client_credentials"]}, {**SERVICE, "scope": "", "token_endpoint_auth_method": "none"},
     "invalid_client_metadata"),
    ({}, {**WEB, "jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}}, "invalid_client_metadata"),
    # the policy, checked after ClientConfig's rules
    ({"redirect_uri_patterns": ["https://*.apps.test/cb"]}, {**WEB, "redirect_uris": ["https://a.b.apps.test/cb"]},
     "invalid_redirect_uri"),
    ({"redirect_uri_patterns": ["https://*.apps.test/cb"]}, {**WEB, "redirect_uris": ["https://x.apps.test/cb2"]},
     "invalid_redirect_uri"),
    ({}, SERVICE, "invalid_client_metadata"),  # client_credentials is not in the default policy
    ({"grant_types": ["client_credentials"]}, SERVICE, "invalid_client_metadata"),  # nor api:read beyond openid
    ({}, {**WEB, "scope": "openid profile"}, "invalid_client_metadata"),
    ({"token_endpoint_auth_methods": ["none"]}, WEB, "invalid_client_metadata"),
    ({}, {**WEB, "token_endpoint_auth_method": "client_secret_post"}, "invalid_client_metadata"),
    ({}, [WEB], "invalid_client_metadata"),
]


@pytest.mark.parametrize(("policy", "body", "error"), BAD)
async def test_bad_metadata_is_refused_the_rfc_7591_way_and_stores_nothing(registrar, app, policy, body, error):
    initial, issued = await registrar.initial_token(**policy)
    before = await client_count(app)
    response = await registrar.register(initial, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"] == error, response.json()
    assert await client_count(app) == before and await uses_left(app, issued["id"]) == 1


NAMES = sorted(REGISTRABLE | {"client_id", "client_secret", "software_statement", "introspection", "require_pkce",
                              "registration_access_token", "client_id_issued_at"})
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20), st.sampled_from([
    "https://rp.test/cb", "http://127.0.0.1/cb", "com.example.app:/cb", "client_credentials", "authorization_code",
    "refresh_token", "code", "none", "client_secret_post", "private_key_jwt", "openid", "native", "web"]))
VALUES = st.recursive(LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=8)
GARBAGE = st.one_of(st.dictionaries(st.sampled_from(NAMES), VALUES, max_size=6), VALUES)
METADATA_ERRORS = {"invalid_client_metadata", "invalid_redirect_uri", "invalid_software_statement",
                   "unapproved_software_statement"}


@settings(max_examples=40, derandomize=True, database=None, deadline=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=GARBAGE)
async def test_garbage_is_registered_or_refused_the_rfc_7591_way_and_then_stores_nothing(registrar, app, body):
    initial, issued = await registrar.initial_token(uses=2)
    before = await client_count(app)
    response = await registrar.register(initial, body)
    assert response.status_code in (201, 400), response.text
    if response.status_code == 400:
        assert response.json()["error"] in METADATA_ERRORS, response.text
        assert await client_count(app) == before and await uses_left(app, issued["id"]) == 2


async def test_bodies_that_are_not_client_metadata_are_refused_and_store_nothing(registrar, app):
    initial, issued = await registrar.initial_token()
    before = await client_count(app)
    not_json = await registrar.register(initial, content=b"{redirect_uris: nope")
    assert not_json.status_code == 400 and not_json.json()["error"] == "invalid_client_metadata"
    wrong_type = await registrar.register(initial, content=b"redirect_uris=x", content_type="text/plain")
    assert wrong_type.status_code == 415
    too_big = await registrar.register(initial, {**WEB, "client_name": "x" * 70_000})
    assert too_big.status_code == 413
    assert await client_count(app) == before and await uses_left(app, issued["id"]) == 1


async def test_a_missing_unknown_expired_used_or_revoked_initial_token_is_refused(registrar, app):
    before = await client_count(app)
    refused_bearer(await registrar.register(None, WEB))
    refused_bearer(await registrar.register("not-a-token", WEB))

    expired, expired_body = await registrar.initial_token()
    async with app.state.iam.stores["token"].engine.begin() as conn:
        await conn.execute(update(initial_access_tokens).where(initial_access_tokens.c.id == expired_body["id"])
                           .values(expires_at=int(time.time()) - 1))
    refused_bearer(await registrar.register(expired, WEB))

    revoked, revoked_body = await registrar.initial_token()
    gone = await registrar.http.delete(f"/admin/v1/initial-access-tokens/{revoked_body['id']}",
                                       headers=registrar.admin)
    assert gone.status_code == 204
    refused_bearer(await registrar.register(revoked, WEB))
    assert await client_count(app) == before

    single, single_body = await registrar.initial_token()
    assert (await registrar.register(single, WEB)).status_code == 201
    assert await uses_left(app, single_body["id"]) == 0
    refused_bearer(await registrar.register(single, WEB))
    assert await client_count(app) == before + 1


async def test_two_registrations_at_once_with_a_single_use_token_one_wins(registrar, app):
    initial, issued = await registrar.initial_token()
    before = await client_count(app)
    answers = await asyncio.gather(*(registrar.register(initial, {**WEB, "client_name": name})
                                     for name in ("first", "second")))
    assert sorted(answer.status_code for answer in answers) == [201, 401], [a.text for a in answers]
    assert await client_count(app) == before + 1 and await uses_left(app, issued["id"]) == 0


# -- RFC 7592 ---------------------------------------------------------------------------------------------------
async def test_management_needs_that_clients_registration_access_token(registrar, app):
    one = await registrar.registered(**SERVICE)
    other = await registrar.registered(**SERVICE)
    path_id, access = one["client_id"], one["registration_access_token"]
    for method, body in (("GET", None), ("PUT", {**SERVICE, "client_id": path_id}), ("DELETE", None)):
        refused_bearer(await registrar.manage(method, path_id, other["registration_access_token"], body))
        refused_bearer(await registrar.manage(method, path_id, access + "x", body))
        refused_bearer(await registrar.manage(method, "no-such-client", access, body))
    # A client of the administration API or of the config file has no registration access token.
    created = await registrar.http.post("/admin/v1/clients", json=SERVICE, headers=registrar.admin)
    assert created.status_code == 201
    refused_bearer(await registrar.manage("GET", created.json()["client_id"], access))
    refused_bearer(await registrar.manage("GET", "svc-basic", access))
    assert (await registrar.manage("GET", path_id, access)).status_code == 200


async def test_a_registered_client_this_release_cannot_read_is_503_to_manage_and_stays_as_stored(registrar, app):
    """Stored by a newer release (a key this one does not know): its registrant is told to come back (503
    temporarily_unavailable), never a 500, and nothing is changed by this replica."""
    one = await registrar.registered(**SERVICE)
    path_id, access = one["client_id"], one["registration_access_token"]
    async with app.state.iam.stores["token"].engine.begin() as conn:
        metadata = json.loads((await conn.execute(select(clients_table.c.metadata).where(
            clients_table.c.client_id == path_id))).scalar_one())
        await conn.execute(update(clients_table).where(clients_table.c.client_id == path_id).values(
            metadata=json.dumps({**metadata, "tos_uri": "https://rp.example/terms"})))
    for method, body in (("GET", None), ("PUT", {**SERVICE, "client_id": path_id}), ("DELETE", None)):
        answer = await registrar.manage(method, path_id, access, body)
        assert answer.status_code == 503 and answer.json()["error"] == "temporarily_unavailable", answer.text
    async with app.state.iam.stores["token"].engine.connect() as conn:
        version, stored = (await conn.execute(select(clients_table.c.version, clients_table.c.metadata).where(
            clients_table.c.client_id == path_id))).one()
    assert version == 1 and "tos_uri" in json.loads(stored)

async def test_an_update_keeps_to_rfc_7592_and_to_the_policy_it_was_registered_under(registrar, app):
    registered = await registrar.registered(**SERVICE, client_name="Before")
    client_id, access, secret = (registered["client_id"], registered["registration_access_token"],
                                 registered["client_secret"])
    for body, error in (
            ({**SERVICE, "client_name": "x"}, "invalid_client_metadata"),  # §2.2: client_id is required
            ({**SERVICE, "client_id": "other", "client_name": "x"}, "invalid_client_metadata"),
            ({**SERVICE, "client_id": client_id, "client_secret": secret + "x"}, "invalid_client_metadata"),
            ({**SERVICE, "client_id": client_id, "scope": "api:write"}, "invalid_client_metadata"),  # the policy
            ({**SERVICE, "client_id": client_id, "grant_types": ["authorization_code"],
              "redirect_uris": ["https://rp.test/cb"]}, "invalid_client_metadata"),
            ({**SERVICE, "client_id": client_id, "redirect_uris": ["https://rp.test/cb#x"]}, "invalid_redirect_uri")):
        response = await registrar.manage("PUT", client_id, access, body)
        assert response.status_code == 400, response.text
        assert response.json()["error"] == error
    assert (await registrar.manage("GET", client_id, access)).json()["client_name"] == "Before"
    echoed = {**registered, "client_name": "After", "introspection": True}  # what the server sent, sent back
    replaced = await registrar.manage("PUT", client_id, access, echoed)
    assert replaced.status_code == 200, replaced.text
    assert replaced.json()["client_name"] == "After" and "client_secret" not in replaced.json()
    assert not app.state.iam.token.clients.get(client_id).introspection
    assert app.state.iam.token.clients.get(client_id).require_consent


# -- software statements (RFC 7591 §2.3, §3.1.1) ----------------------------------------------------------------
async def test_a_software_statements_claims_take_precedence(registrar):
    initial, _ = await registrar.initial_token()
    signed = statement({"client_name": "Vendor App", "redirect_uris": ["https://vendor-app.test/cb"],
                        "exp": int(time.time()) + 600})
    response = await registrar.register(initial, {**WEB, "software_statement": signed})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["client_name"] == "Vendor App" and body["redirect_uris"] == ["https://vendor-app.test/cb"]
    assert body["software_statement"] == signed  # RFC 7591 §3.2.1: returned unmodified


def _unsigned(claims: dict) -> str:
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none'})}.{part({'iss': VENDOR, **claims})}."


BAD_STATEMENTS = [
    (lambda: jwt.encode({"alg": "ES256"}, {"iss": "https://elsewhere.test", "client_name": "x"}, STRANGER_KEY),
     "unapproved_software_statement"),
    (lambda: statement({"client_name": "x"}, key=STRANGER_KEY), "invalid_software_statement"),
    (lambda: statement({"client_name": "x", "exp": int(time.time()) - 10}), "invalid_software_statement"),
    (lambda: _unsigned({"client_name": "x"}), "invalid_software_statement"),
    (lambda: "not a jwt", "invalid_software_statement"),
    (lambda: {"client_name": "x"}, "invalid_software_statement"),
    (lambda: statement({"redirect_uris": ["https://rp.test/cb#x"]}), "invalid_redirect_uri"),
]


@pytest.mark.parametrize(("make", "error"), BAD_STATEMENTS)
async def test_a_software_statement_that_does_not_hold_is_refused_and_stores_nothing(registrar, app, make, error):
    initial, issued = await registrar.initial_token()
    before = await client_count(app)
    response = await registrar.register(initial, {**WEB, "software_statement": make()})
    assert response.status_code == 400, response.text
    assert response.json()["error"] == error, response.json()
    assert await client_count(app) == before and await uses_left(app, issued["id"]) == 1


# -- the rate limit per initial access token ------------------------------------------------------------------
async def test_a_flood_with_a_multi_use_token_is_held_to_the_rate_limit(registrar, app):
    initial, issued = await registrar.initial_token(uses=0)
    answers = [await registrar.register(initial, WEB) for _ in range(RATE_LIMIT + 3)]
    assert [a.status_code for a in answers] == [201] * RATE_LIMIT + [429] * 3
    throttled = answers[-1]
    assert throttled.json()["error"] and 1 <= int(throttled.headers["retry-after"]) <= 60
    async with app.state.iam.stores["token"].engine.connect() as conn:
        stored = (await conn.execute(select(func.count()).select_from(clients_table)
                                     .where(clients_table.c.initial_token_id == issued["id"]))).scalar_one()
    assert stored == RATE_LIMIT and await uses_left(app, issued["id"]) is None


# -- issuing initial access tokens: the administration API ----------------------------------------------------
async def test_initial_tokens_are_issued_listed_and_revoked_by_the_administration_api(registrar, caplog):
    caplog.set_level("INFO", logger="iam.audit")
    token, body = await registrar.initial_token(uses=3, ttl=600, scope="api:read", grant_types=["client_credentials"])
    assert body["uses"] == 3 and 590 <= body["expires_at"] - time.time() <= 600
    assert body["policy"] == {"grant_types": ["client_credentials"], "redirect_uri_patterns": [], "scope": "api:read",
                              "token_endpoint_auth_methods": ["client_secret_basic", "private_key_jwt", "none"]}
    assert audited(caplog, "client.initial_token_issued")[-1]["details"]["token_id"] == body["id"]
    listed = await registrar.http.get("/admin/v1/initial-access-tokens", headers=registrar.admin)
    assert listed.status_code == 200 and token not in listed.text
    assert body["id"] in [t["id"] for t in listed.json()["initial_access_tokens"]]
    default = (await registrar.initial_token())[1]
    assert default["uses"] == 1 and 86390 <= default["expires_at"] - time.time() <= 86400
    for bad in ({"ttl": 30 * 86400 + 1}, {"ttl": 0}, {"uses": -1}, {"grant_types": ["password"]},
                {"redirect_uri_patterns": ["http://*.example.com/cb"]}, {"scope": 'a"b'}, {"colour": "blue"},
                {"token_endpoint_auth_methods": ["magic"]}):
        refused = await registrar.http.post("/admin/v1/initial-access-tokens", json=bad, headers=registrar.admin)
        assert refused.status_code == 400 and refused.json()["error"] == "invalid_request", (bad, refused.text)
    path = f"/admin/v1/initial-access-tokens/{body['id']}"
    assert (await registrar.http.delete(path, headers=registrar.admin)).status_code == 204
    assert audited(caplog, "client.initial_token_revoked")[-1]["details"]["token_id"] == body["id"]
    assert (await registrar.http.delete(path, headers=registrar.admin)).status_code == 404


async def test_initial_tokens_need_the_clients_scopes(registrar):
    reader = await client_token(registrar.http, "clients-reader", ADMIN_SECRETS["clients-reader"])
    as_reader = {"Authorization": f"Bearer {reader}"}
    assert (await registrar.http.get("/admin/v1/initial-access-tokens", headers=as_reader)).status_code == 200
    refused = await registrar.http.post("/admin/v1/initial-access-tokens", json={}, headers=as_reader)
    assert refused.status_code == 403
    assert (await registrar.http.delete("/admin/v1/initial-access-tokens/x", headers=as_reader)).status_code == 403
    assert (await registrar.http.get("/admin/v1/initial-access-tokens")).status_code == 401


# -- purge, discovery ---------------------------------------------------------------------------------------------
async def test_the_purge_deletes_expired_and_used_up_initial_tokens(registrar, app):
    expired = (await registrar.initial_token())[1]["id"]
    used = (await registrar.initial_token())
    live = (await registrar.initial_token())[1]["id"]
    await registrar.registered(used[0], **WEB)
    async with app.state.iam.stores["token"].engine.begin() as conn:
        await conn.execute(update(initial_access_tokens).where(initial_access_tokens.c.id == expired)
                           .values(expires_at=int(time.time()) - 1))
    await app.state.iam.purge(int(time.time()))
    async with app.state.iam.stores["token"].engine.connect() as conn:
        left = set((await conn.execute(select(initial_access_tokens.c.id))).scalars())
    assert live in left and expired not in left and used[1]["id"] not in left


async def test_discovery_advertises_the_registration_endpoint(registrar):
    document = (await registrar.http.get("/.well-known/openid-configuration")).json()
    assert document["registration_endpoint"] == f"{ISSUER}/oauth/v2/register"  # RFC 8414 §2


async def test_without_registration_there_is_no_endpoint_and_none_is_advertised(store_urls, tmp_path):
    application = create_app(make_settings(tmp_path, store_urls))
    async with application.router.lifespan_context(application), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=application), base_url=ISSUER) as http:
        assert "registration_endpoint" not in (await http.get("/.well-known/oauth-authorization-server")).json()
        unknown = await http.get("/oauth/v2/no-such-path")
        for method in ("POST", "GET"):
            answer = await http.request(method, "/oauth/v2/register", json=WEB)
            assert (answer.status_code, answer.text) == (unknown.status_code, unknown.text) == (404, unknown.text)
        assert (await http.get("/oauth/v2/register/some-client")).status_code == 404


@contextlib.asynccontextmanager
async def own_registrar(tmp_path, store_urls, **registration):
    """An app of its own with these registration settings, and a Registrar on it."""
    settings = make_settings(tmp_path, store_urls, clients=client_config() + admin_clients(),
                             registration=registration_settings(**registration))
    application = create_app(settings)
    async with application.router.lifespan_context(application), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=application), base_url=ISSUER) as http:
        yield application, Registrar(http, await client_token(http, "clients-admin", ADMIN_SECRETS["clients-admin"]))


async def test_a_required_software_statement_must_be_there(store_urls, tmp_path):
    async with own_registrar(tmp_path, store_urls, software_statement_required=True) as (application, registrar):
        initial, issued = await registrar.initial_token(uses=2)
        missing = await registrar.register(initial, WEB)
        assert missing.status_code == 400 and missing.json()["error"] == "invalid_software_statement"
        assert await client_count(application) == 0 and await uses_left(application, issued["id"]) == 2
        vouched = await registrar.register(initial, {**WEB, "software_statement": statement({"client_name": "V"})})
        assert vouched.status_code == 201, vouched.text


async def test_a_statement_issuers_keys_come_from_its_jwks_uri_and_an_outage_is_503(store_urls, tmp_path, kube):
    """An issuer trusted by `jwks_uri` (here the service-account issuer's JWKS, served on a real port): its keys are
    fetched to verify a statement; a key it does not publish is refused; keys that cannot be fetched are a 503,
    not the registrant's invalid statement, and nothing is stored."""
    remote, down = "https://keys.vendor.test", "https://down.vendor.test"
    issuers = [{"issuer": remote, "jwks_uri": kube.discovery()["jwks_uri"]},
               {"issuer": down, "jwks_uri": f"http://127.0.0.1:{free_port()}/jwks"}]
    async with own_registrar(tmp_path, store_urls, software_statement_issuers=issuers) as (application, registrar):
        initial, issued = await registrar.initial_token(uses=3)

        def signed_by(issuer: str, key, kid: str) -> str:
            return jwt.encode({"alg": "ES256", "kid": kid}, {"iss": issuer, "client_name": "Remote"}, key)

        unknown_key = await registrar.register(initial, {**WEB, "software_statement": signed_by(
            remote, STRANGER_KEY, kube.kids["ES256"])})
        assert unknown_key.status_code == 400 and unknown_key.json()["error"] == "invalid_software_statement"
        unavailable = await registrar.register(initial, {**WEB, "software_statement": signed_by(
            down, kube.keys["ES256"], kube.kids["ES256"])})
        assert unavailable.status_code == 503 and unavailable.json()["error"] == "temporarily_unavailable"
        assert unavailable.headers["retry-after"]
        assert await client_count(application) == 0 and await uses_left(application, issued["id"]) == 3
        vouched = await registrar.register(initial, {**WEB, "software_statement": signed_by(
            remote, kube.keys["ES256"], kube.kids["ES256"])})
        assert vouched.status_code == 201, vouched.text
        assert vouched.json()["client_name"] == "Remote"

