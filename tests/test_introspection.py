"""Introspection (RFC 7662), the phantom JWT (RFC 9068), forward-auth, revocation (RFC 7009)."""

import asyncio
import json

import httpx
import pytest
from joserfc import jwt
from joserfc.errors import UnsupportedAlgorithmError
from joserfc.jwk import KeySet
from pydantic import ValidationError
from sqlalchemy import event, update

from iam.app import StartupError, create_app
from iam.config import ClientConfig
from iam.token.access_tokens import introspection_json, introspection_members
from iam.token.holders import Holder
from iam.token.store import access_tokens
from tests.conftest import ISSUER, SECRETS, basic, client_config, make_settings
from tests.test_token_endpoint import get_token


async def introspect(client, token, caller="svc-post", accept=None):
    headers = {"Accept": accept} if accept else {}
    data = {"token": token, "client_id": caller, "client_secret": SECRETS[caller]} if caller == "svc-post" else {"token": token}
    if caller != "svc-post":
        headers.update(basic(caller))
    return await client.post("/oauth/v2/introspect", data=data, headers=headers)


async def jwks(client) -> KeySet:
    return KeySet.import_key_set((await client.get("/oauth/v2/jwks")).json())


async def test_active_token_introspects_with_rfc7662_members(client):
    token = (await get_token(client))["access_token"]
    response = await introspect(client, token)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["active"] is True
    assert body["client_id"] == "svc-basic"
    assert body["scope"] == "api:read api:write"
    assert body["sub"] == "svc-basic"
    assert body["token_type"] == "Bearer"
    assert body["iss"] == ISSUER
    assert body["aud"] == "https://api.test"
    assert body["exp"] - body["iat"] == 600


@pytest.mark.parametrize("holder", [None, Holder("jkt", "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"),
                                    Holder("x5t#S256", "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2")])
async def test_the_introspection_answer_is_the_tokens_claims_with_active_and_token_type(app, holder):
    """RFC 7662 §2.2 members from the JWT's claims: the bytes a bearer token's answer is spliced from read as the
    same object as the claims parsed and encoded again; a bound token is DPoP (RFC 9449 §6.2) or Bearer (RFC 8705)."""
    tokens = app.state.iam.token.access_tokens
    client = app.state.iam.token.clients.get("svc-basic")
    issued = tokens.mint(client, "someone", "api:read", holder=holder, claims={"note": 'caf\u00e9 {"x": [1, 2]}'})
    answer = json.loads(introspection_json(issued.jwt))
    assert answer == introspection_members(issued.jwt) == {
        "active": True, **jwt.decode(issued.jwt, app.state.iam.keys.public_set).claims,
        "token_type": "DPoP" if holder is not None and holder.is_dpop else "Bearer"}
    assert list(answer)[0] == "active" and list(answer)[-1] == "token_type"


async def test_accept_jwt_returns_the_paired_rfc9068_jwt(client):
    token = (await get_token(client))["access_token"]
    response = await introspect(client, token, accept="application/jwt")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/jwt")
    decoded = jwt.decode(response.text, await jwks(client), algorithms=["ES256", "RS256"])
    assert decoded.header["typ"] == "at+jwt"
    assert decoded.header["kid"]
    claims = decoded.claims
    assert claims["iss"] == ISSUER and claims["client_id"] == "svc-basic" and claims["sub"] == "svc-basic"
    assert claims["aud"] == "https://api.test" and claims["jti"] and claims["exp"] > claims["iat"]
    # The same JWT every time: signed once at issuance.
    again = await introspect(client, token, accept="application/jwt")
    assert again.text == response.text


async def test_signed_introspection_response_rfc9701(client):
    token = (await get_token(client))["access_token"]
    response = await introspect(client, token, accept="application/token-introspection+jwt")
    assert response.headers["content-type"].startswith("application/token-introspection+jwt")
    decoded = jwt.decode(response.text, await jwks(client), algorithms=["RS256"])
    assert decoded.header["typ"] == "token-introspection+jwt"
    assert decoded.claims["iss"] == ISSUER and decoded.claims["aud"] == "svc-post"
    assert decoded.claims["token_introspection"]["active"] is True
    assert decoded.claims["token_introspection"]["client_id"] == "svc-basic"


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA", "Ed25519"])
async def test_signed_introspection_uses_the_clients_registered_alg_rfc9701_s6(tmp_path, store_urls, alg):
    resource_server = {"client_id": "rs", "client_secret": "rs-secret-0123456789abcdef",
                       "grant_types": ["client_credentials"], "introspection_signed_response_alg": alg,
                       "introspection": True}
    settings = make_settings(tmp_path, store_urls, clients=[*client_config(), resource_server])
    app = create_app(settings)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url=ISSUER) as client:
        meta = (await client.get("/.well-known/oauth-authorization-server")).json()
        assert alg in meta["introspection_signing_alg_values_supported"]
        token = (await get_token(client))["access_token"]
        response = await client.post("/oauth/v2/introspect", data={"token": token},
                                     auth=("rs", "rs-secret-0123456789abcdef"),
                                     headers={"Accept": "application/token-introspection+jwt"})
        assert response.status_code == 200
        published = KeySet.import_key_set((await client.get(meta["jwks_uri"].removeprefix(ISSUER))).json())
        decoded = jwt.decode(response.text, published, algorithms=[alg])
        assert decoded.header["alg"] == alg and decoded.header["typ"] == "token-introspection+jwt"
        assert decoded.claims["aud"] == "rs" and decoded.claims["token_introspection"]["active"] is True
        # A verifier that expects another algorithm refuses it: the header names the one actually used.
        with pytest.raises(UnsupportedAlgorithmError):
            jwt.decode(response.text, published, algorithms=["RS256" if alg != "RS256" else "ES256"])
        # Callers that registered nothing still get RS256 (RFC 9701 §6: the default).
        default = await introspect(client, token, accept="application/token-introspection+jwt")
        assert jwt.decode(default.text, published, algorithms=["RS256"]).header["alg"] == "RS256"


async def test_a_client_alg_the_key_ring_cannot_sign_stops_start_up(tmp_path, store_urls):
    settings = make_settings(tmp_path, store_urls, clients=[*client_config(), {
        "client_id": "rs", "client_secret": "rs-secret-0123456789abcdef", "grant_types": ["client_credentials"],
        "introspection_signed_response_alg": "EdDSA"}])
    from iam.keys import KeyRing

    KeyRing(settings.keys.dir).load(generate=True)
    for path in settings.keys.dir.glob("*-ed25519-*.json"):
        path.unlink()  # a key directory made before Ed25519 keys existed
    app = create_app(settings)
    with pytest.raises(StartupError, match="introspection_signed_response_alg EdDSA"):
        async with app.router.lifespan_context(app):
            pass


async def test_phantom_forward_auth_swaps_opaque_for_jwt(client):
    token = (await get_token(client))["access_token"]
    response = await client.get("/oauth/v2/phantom", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    scheme, _, jwt_text = response.headers["authorization"].partition(" ")
    assert scheme == "Bearer"
    assert jwt.decode(jwt_text, await jwks(client), algorithms=["ES256"]).claims["client_id"] == "svc-basic"
    # Envoy ext_authz appends the original path and keeps the method.
    envoy = await client.post("/oauth/v2/phantom/orders/42", headers={"Authorization": f"Bearer {token}"})
    assert envoy.headers["authorization"] == response.headers["authorization"]


async def test_phantom_with_an_audience_passes_only_tokens_meant_for_that_api(client):
    """ASVS 5 V10.3.1: the ingress names the route's audience in its auth URL; another API's token is 401."""
    token = (await get_token(client))["access_token"]  # svc-basic: aud https://api.test
    bearer = {"Authorization": f"Bearer {token}"}
    ok = await client.get("/oauth/v2/phantom", params={"audience": "https://api.test"}, headers=bearer)
    assert ok.status_code == 200 and ok.headers["authorization"].startswith("Bearer ey")
    for other in ("https://other.test", "https://api.test/"):
        refused = await client.get("/oauth/v2/phantom", params={"audience": other}, headers=bearer)
        assert refused.status_code == 401 and "authorization" not in refused.headers
        assert 'error="invalid_token"' in refused.headers["www-authenticate"]
    both = await client.get("/oauth/v2/phantom?audience=https://api.test&audience=https://other.test", headers=bearer)
    assert both.status_code == 401  # every audience named must be in the token's
    # Without a configured audience a token is for the issuer itself (RFC 9068 §3).
    issuer_only = (await get_token(client, "gateway"))["access_token"]
    assert (await client.get("/oauth/v2/phantom", params={"audience": "https://api.test"},
                             headers={"Authorization": f"Bearer {issuer_only}"})).status_code == 401
    # Under /oauth/v2/phantom/... the query is the API caller's (Envoy appends it): it is not read.
    envoy = await client.get("/oauth/v2/phantom/orders", params={"audience": "https://other.test"}, headers=bearer)
    assert envoy.status_code == 200


@pytest.mark.parametrize(
    "header",
    [None, "Bearer", "Basic abc", "Bearer not-a-token", "Bearer " + "A" * 43, "Bearer " + "x" * 5000],
)
async def test_phantom_without_a_live_token_is_401(client, header):
    response = await client.get("/oauth/v2/phantom", headers={"Authorization": header} if header else {})
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert "authorization" not in response.headers


@pytest.mark.parametrize("token", ["", "garbage", "A" * 43, "x" * 4000, "é" * 10])
async def test_unknown_or_malformed_tokens_are_inactive(client, token):
    response = await introspect(client, token)
    if token == "":
        assert response.status_code == 400 and response.json()["error"] == "invalid_request"
    else:
        assert response.status_code == 200
        assert response.json() == {"active": False}


FOREIGN_JWT = "eyJhbGciOiJSUzI1NiJ9." + "eyJncm91cHMiOlsi" + "Z3JvdXAtYS" * 1500 + ".c2ln"  # ~15 KB, many groups


@pytest.mark.parametrize("token", ["x" * 5000, FOREIGN_JWT], ids=["5000-chars", "foreign-jwt"])
async def test_a_long_token_of_another_issuer_is_inactive_rfc7662_s2_2(client, token):
    """RFC 7662 §2.2: any token the server does not know is `active: false`, however long, within the body limit."""
    assert (await introspect(client, token)).json() == {"active": False}
    assert (await introspect(client, token, accept="application/jwt")).json() == {"active": False}
    # RFC 7009 §2.2: revoking a token the server does not know answers 200.
    revoked = await client.post("/oauth/v2/revoke", data={"token": token}, headers=basic("svc-basic"))
    assert revoked.status_code == 200


async def test_a_body_over_the_limit_is_still_refused(client):
    response = await introspect(client, "x" * 17000)
    assert response.status_code == 413 and response.json()["error"] == "invalid_request"
    # Other parameters keep their per-value bound.
    response = await client.post("/oauth/v2/introspect", headers=basic("svc-basic"),
                                 data={"token": "x", "token_type_hint": "y" * 5000})
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"


async def test_introspection_requires_client_authentication(client):
    token = (await get_token(client))["access_token"]
    anonymous = await client.post("/oauth/v2/introspect", data={"token": token})
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "invalid_client"
    wrong = await client.post("/oauth/v2/introspect", data={"token": token}, headers=basic("svc-basic", "nope"))
    assert wrong.status_code == 401
    public = await client.post("/oauth/v2/introspect", data={"token": token, "client_id": "native"})
    assert public.status_code == 401


async def test_expired_token_is_inactive_everywhere(client, app):
    token = (await get_token(client))["access_token"]
    async with app.state.iam.stores["token"].engine.begin() as conn:
        await conn.execute(update(access_tokens).values(expires_at=0))
    assert (await introspect(client, token)).json() == {"active": False}
    assert (await introspect(client, token, accept="application/jwt")).json() == {"active": False}
    assert (await client.get("/oauth/v2/phantom", headers={"Authorization": f"Bearer {token}"})).status_code == 401


async def test_revocation_takes_effect_at_once(client):
    token = (await get_token(client))["access_token"]
    other = (await get_token(client))["access_token"]
    response = await client.post("/oauth/v2/revoke", data={"token": token}, headers=basic("svc-basic"))
    assert response.status_code == 200
    assert (await introspect(client, token)).json() == {"active": False}
    assert (await introspect(client, token, accept="application/jwt")).json() == {"active": False}
    assert (await client.get("/oauth/v2/phantom", headers={"Authorization": f"Bearer {token}"})).status_code == 401
    assert (await introspect(client, other)).json()["active"] is True  # only that token


async def test_revocation_of_another_clients_token_answers_200_and_changes_nothing(client):
    token = (await get_token(client))["access_token"]
    response = await client.post(
        "/oauth/v2/revoke", data={"token": token, "client_id": "svc-post", "client_secret": SECRETS["svc-post"]}
    )
    assert response.status_code == 200
    assert (await introspect(client, token)).json()["active"] is True


@pytest.mark.parametrize("data", [{"token": "unknown-token"}, {"token": "x", "token_type_hint": "bogus"}])
async def test_revoking_unknown_tokens_answers_200(client, data):
    response = await client.post("/oauth/v2/revoke", data=data, headers=basic("svc-basic"))
    assert response.status_code == 200


async def test_revocation_requires_client_authentication(client):
    token = (await get_token(client))["access_token"]
    response = await client.post("/oauth/v2/revoke", data={"token": token})
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"
    assert (await introspect(client, token)).json()["active"] is True


async def test_introspection_and_forward_auth_are_one_query_without_signing(client, app, monkeypatch):
    """The first call is one indexed lookup; the next ones are served from the hot cache: no query at all.

    Never a signature. Every statement sent to the token store is recorded: SQLAlchemy's, and what runs
    straight on the driver, as the hot lookup does: on the pooled asyncpg connections (PostgreSQL), on the
    store's own sqlite3 reader (SQLite).
    """
    from tests.test_hot_cache import cache_on

    token = (await get_token(client))["access_token"]
    await cache_on(app)
    statements: list[str] = []
    engine = app.state.iam.stores["token"].engine.sync_engine

    def record(conn, cursor, statement, *args):
        statements.append(statement)

    def log_driver_queries(dbapi_connection, record_, proxy):
        if hasattr(dbapi_connection.driver_connection, "add_query_logger"):  # asyncpg
            dbapi_connection.driver_connection.add_query_logger(driver_query)

    def driver_query(logged):
        statements.append(logged.query)

    def no_signing(*args, **kwargs):
        raise AssertionError("the hot path must not sign")

    async def settled() -> list[str]:
        await asyncio.sleep(0.05)  # asyncpg calls query loggers soon after, not during, the query
        return list(statements)

    event.listen(engine, "before_cursor_execute", record)
    event.listen(engine, "checkout", log_driver_queries)
    for pooled in app.state.iam.token.store._direct_idle:  # checked out already, kept for the direct statements
        log_driver_queries(pooled, None, None)
    direct = app.state.iam.token.store.sqlite
    if direct is not None:
        direct.reader.set_trace_callback(statements.append)
    monkeypatch.setattr(app.state.iam.keys, "sign", no_signing)
    try:
        assert (await introspect(client, token)).json()["active"] is True
        first = await settled()
        assert (await introspect(client, token, accept="application/jwt")).status_code == 200
        phantom = await client.get("/oauth/v2/phantom", headers={"Authorization": f"Bearer {token}"})
        assert phantom.status_code == 200
        assert (await introspect(client, token)).json()["active"] is True
        warm = await settled()
    finally:
        event.remove(engine, "before_cursor_execute", record)
        event.remove(engine, "checkout", log_driver_queries)
        if direct is not None:
            direct.reader.set_trace_callback(None)
    assert len(first) == 1, first
    assert first[0].lstrip().upper().startswith("SELECT") and "digest" in first[0]
    assert warm == first  # served from the cache: not one more statement


async def test_concurrent_revocation_and_introspection_never_fail(client):
    tokens = [(await get_token(client))["access_token"] for _ in range(10)]
    calls = [client.post("/oauth/v2/revoke", data={"token": t}, headers=basic("svc-basic")) for t in tokens]
    calls += [introspect(client, t) for t in tokens]
    results = await asyncio.gather(*calls)
    assert all(r.status_code == 200 for r in results)
    for token in tokens:
        assert (await introspect(client, token)).json() == {"active": False}


# -- who may introspect (RFC 7662 §2.1, §2.2, §4) ----------------------------------------------------------
async def test_a_client_without_the_introspection_right_is_refused_and_audited(client, caplog):
    caplog.set_level("INFO", logger="iam.audit")
    token = (await get_token(client))["access_token"]
    for accept in (None, "application/jwt", "application/token-introspection+jwt"):
        response = await introspect(client, token, caller="gateway", accept=accept)
        assert response.status_code == 403, accept
        assert response.json()["error"] == "unauthorized_client"
        assert token not in response.text and "svc-basic" not in response.text
    refused = [r.audit for r in caplog.records if getattr(r, "audit", {}).get("event") == "introspection.refused"]
    assert len(refused) == 3 and {event["client_id"] for event in refused} == {"gateway"}
    assert all(event["outcome"] == "failure" for event in refused)
    # The refusal changed nothing: the token is still live for a client that may look.
    assert (await introspect(client, token)).json()["active"] is True


async def test_a_resource_server_sees_only_the_tokens_meant_for_its_apis(client):
    # webapp may introspect tokens for https://api.test only (tests/conftest.py).
    for_api = (await get_token(client, "svc-basic"))["access_token"]  # aud https://api.test
    other = (await client.post("/oauth/v2/token", data={  # svc-post has no audience: the token's aud is the issuer
        "grant_type": "client_credentials", "client_id": "svc-post", "client_secret": SECRETS["svc-post"]})).json()
    other = other["access_token"]
    assert (await introspect(client, other)).json()["active"] is True  # a gateway (svc-post) sees it
    seen = await introspect(client, for_api, caller="webapp")
    assert seen.status_code == 200 and seen.json()["active"] is True and seen.json()["aud"] == "https://api.test"
    hidden = await introspect(client, other, caller="webapp")
    assert hidden.status_code == 200 and hidden.json() == {"active": False}  # §2.2: nothing about it
    # the same for the phantom JWT and the RFC 9701 signed response
    phantom = await introspect(client, for_api, caller="webapp", accept="application/jwt")
    assert jwt.decode(phantom.text, await jwks(client), algorithms=["ES256", "RS256"]).claims["aud"] == "https://api.test"
    jwt_form = await introspect(client, other, caller="webapp", accept="application/jwt")
    assert jwt_form.json() == {"active": False}
    signed = await introspect(client, other, caller="webapp", accept="application/token-introspection+jwt")
    claims = jwt.decode(signed.text, await jwks(client), algorithms=["RS256"]).claims
    assert claims["aud"] == "webapp" and claims["token_introspection"] == {"active": False}
    signed = await introspect(client, for_api, caller="webapp", accept="application/token-introspection+jwt")
    assert jwt.decode(signed.text, await jwks(client), algorithms=["RS256"]).claims["token_introspection"]["active"]


@pytest.mark.parametrize("client_entry, message", [
    ({"client_id": "spa", "token_endpoint_auth_method": "none", "redirect_uris": ["https://spa.test/cb"],
      "introspection": True}, "introspection needs a confidential client"),
    ({"client_id": "rs", "client_secret": "rs-secret-0123456789abcdef", "grant_types": ["client_credentials"],
      "introspection": {"audiences": []}}, "audiences"),
    ({"client_id": "rs", "client_secret": "rs-secret-0123456789abcdef", "grant_types": ["client_credentials"],
      "introspection": "yes-please"}, "introspection"),
])
def test_an_introspection_right_that_makes_no_sense_is_refused_at_start(client_entry, message):
    with pytest.raises(ValidationError, match=message):
        ClientConfig.model_validate(client_entry)
