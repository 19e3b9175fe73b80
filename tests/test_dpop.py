"""DPoP (RFC 9449) at the token endpoint: proofs are checked (§4.3), tokens bound (§5, §6), nonces (§8), on
SQLite and PostgreSQL. Every refused request is checked to have issued nothing: no access-token row."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import func, select

from iam.config import DPoP
from iam.formats import jwt_claims
from iam.token.dpop import Nonces, normalised_htu
from iam.token.store import access_tokens
from tests.conftest import ISSUER, SECRETS, WEBAPP_CALLBACK, basic, client_config, make_settings
from tests.dpop import DPoPClient, unsigned_proof
from tests.oauth import code_flow

TOKEN = f"{ISSUER}/oauth/v2/token"
KUBECTL_CALLBACK = "http://127.0.0.1/callback"


def dpop_clients() -> list[dict]:
    return [*client_config(), {
        "client_id": "dpop-svc", "client_secret": SECRETS["svc-basic"], "grant_types": ["client_credentials"],
        "scope": "api:read", "dpop_bound_access_tokens": True, "audience": ["https://api.test"]}]


@pytest.fixture
def settings(tmp_path, store_urls):
    return make_settings(tmp_path, store_urls, clients=dpop_clients())


async def token_rows(app) -> int:
    async with app.state.iam.token.store.engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(access_tokens))).scalar_one()


async def client_credentials(http, proof: str | None, client_id: str = "svc-basic"):
    headers = basic(client_id, SECRETS["svc-basic"])
    if proof is not None:
        headers["DPoP"] = proof
    return await http.post("/oauth/v2/token", data={"grant_type": "client_credentials"}, headers=headers)


def assert_refused(response, error: str = "invalid_dpop_proof") -> None:
    assert response.status_code == 400, response.text
    assert response.json()["error"] == error
    assert "access_token" not in response.json()


# -- the proof -------------------------------------------------------------------------------------------------
def test_htu_is_compared_after_normalisation():
    """§4.3 item 9: no query or fragment; RFC 3986 §6.2.2/§6.2.3 syntax- and scheme-based normalisation."""
    assert normalised_htu("HTTPS://Server.Example:443/a%7eb?x=1#f") == "https://server.example/a~b"
    assert normalised_htu("http://h:8080") == "http://h:8080/"
    assert normalised_htu("https://h/%2f") == "https://h/%2F"
    assert normalised_htu("https://h/a") != normalised_htu("https://h/b")


def test_nonces_rotate_and_the_previous_one_is_still_accepted():
    now = [1_000_000.0]
    nonces = Nonces(DPoP(nonce_lifetime=60), "k" * 43, clock=lambda: now[0])
    first = nonces.current()
    assert nonces.accepts(first)
    now[0] += 60
    assert nonces.current() != first and nonces.accepts(first)  # rotated; the previous window still good
    now[0] += 60
    assert not nonces.accepts(first)  # expired
    assert Nonces(DPoP(nonce_lifetime=60), "k" * 43, clock=lambda: now[0]).accepts(nonces.current())  # replicas


@pytest.mark.parametrize("alg", ["ES256", "RS256", "PS256", "EdDSA", "Ed25519"])
async def test_a_valid_proof_binds_the_access_token(client, app, alg):
    """§5, §6.1: token_type DPoP; cnf.jkt in the JWT and in introspection (§6.2)."""
    key = DPoPClient(alg)
    response = await client_credentials(client, key.proof("POST", TOKEN))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "DPoP"
    live = await app.state.iam.token.access_tokens.live(body["access_token"])
    assert jwt_claims(live.jwt)["cnf"] == {"jkt": key.jkt}
    introspected = await client.post("/oauth/v2/introspect", data={"token": body["access_token"]},
                                     headers=basic("svc-basic"))
    assert introspected.json()["cnf"] == {"jkt": key.jkt} and introspected.json()["token_type"] == "DPoP"


async def test_without_a_proof_the_token_is_a_bearer_token(client, app):
    body = (await client_credentials(client, None)).json()
    assert body["token_type"] == "Bearer"
    assert "cnf" not in jwt_claims((await app.state.iam.token.access_tokens.live(body["access_token"])).jwt)


KEY = DPoPClient()


@pytest.mark.parametrize("proof", [
    pytest.param(lambda: KEY.proof("GET", TOKEN), id="wrong-htm"),
    pytest.param(lambda: KEY.proof("POST", f"{ISSUER}/oauth/v2/introspect"), id="wrong-htu"),
    pytest.param(lambda: KEY.proof("POST", TOKEN, iat=int(time.time()) - 3600), id="old-iat"),
    pytest.param(lambda: KEY.proof("POST", TOKEN, iat=int(time.time()) + 3600), id="future-iat"),
    pytest.param(lambda: KEY.proof("POST", TOKEN, jti=None), id="no-jti"),
    pytest.param(lambda: KEY.proof("POST", TOKEN, header={"typ": "JWT"}), id="wrong-typ"),
    pytest.param(lambda: unsigned_proof({"typ": "dpop+jwt", "alg": "none", "jwk": KEY.key.as_dict(private=False)},
                                        {"jti": "x", "htm": "POST", "htu": TOKEN, "iat": int(time.time())}),
                 id="alg-none"),
    pytest.param(lambda: _hs256_proof(), id="alg-HS256"),
    pytest.param(lambda: KEY.proof("POST", TOKEN, header={"jwk": KEY.key.as_dict(private=True)}),
                 id="private-key-in-jwk"),
    pytest.param(lambda: KEY.proof("POST", TOKEN, header={"jwk": DPoPClient().key.as_dict(private=False)}),
                 id="signed-by-another-key"),
    pytest.param(lambda: "not a jwt", id="garbage"),
])
async def test_a_bad_proof_is_invalid_dpop_proof_and_issues_nothing(client, app, proof):
    assert_refused(await client_credentials(client, proof()))
    assert await token_rows(app) == 0


def _hs256_proof() -> str:
    import json

    from joserfc import jws
    from joserfc.jwk import OctKey
    secret = OctKey.generate_key(256)
    claims = {"jti": "h", "htm": "POST", "htu": TOKEN, "iat": int(time.time())}
    return jws.serialize_compact({"typ": "dpop+jwt", "alg": "HS256", "jwk": secret.as_dict(private=False)},
                                 json.dumps(claims).encode(), secret, algorithms=["HS256"])


async def test_a_reused_jti_is_refused(client, app):
    """§11.1: a proof is single use, on every replica (the token store holds its jti)."""
    proof = KEY.proof("POST", TOKEN)
    assert (await client_credentials(client, proof)).status_code == 200
    assert_refused(await client_credentials(client, proof))
    assert await token_rows(app) == 1


async def test_two_dpop_headers_are_refused(client, app):
    headers = [*basic("svc-basic").items(), ("DPoP", KEY.proof("POST", TOKEN)), ("DPoP", KEY.proof("POST", TOKEN))]
    response = await client.post("/oauth/v2/token", data={"grant_type": "client_credentials"}, headers=headers)
    assert_refused(response)
    assert await token_rows(app) == 0


async def test_a_dpop_bound_client_needs_a_proof(client, app):
    """dpop_bound_access_tokens (RFC 9449 §5.2): no proof, no token."""
    assert_refused(await client_credentials(client, None, "dpop-svc"))
    assert await token_rows(app) == 0
    response = await client_credentials(client, KEY.proof("POST", TOKEN), "dpop-svc")
    assert response.status_code == 200 and response.json()["token_type"] == "DPoP"


async def test_discovery_names_the_proof_algorithms(client):
    metadata = (await client.get("/.well-known/openid-configuration")).json()
    assert metadata["dpop_signing_alg_values_supported"] == ["ES256", "RS256", "PS256", "EdDSA", "Ed25519"]


# -- refresh tokens of public clients (§5) ----------------------------------------------------------------------
async def kubectl_tokens(http, key: DPoPClient | None) -> dict:
    params, verifier, _ = await code_flow(http, "kubectl", KUBECTL_CALLBACK, scope="openid offline_access")
    headers = {"DPoP": key.proof("POST", TOKEN)} if key else {}
    response = await http.post("/oauth/v2/token", headers=headers, data={
        "grant_type": "authorization_code", "code": params["code"], "redirect_uri": KUBECTL_CALLBACK,
        "code_verifier": verifier, "client_id": "kubectl"})
    assert response.status_code == 200, response.text
    return response.json()


async def refresh(http, token: str, proof: str | None):
    headers = {"DPoP": proof} if proof else {}
    return await http.post("/oauth/v2/token", headers=headers, data={
        "grant_type": "refresh_token", "refresh_token": token, "client_id": "kubectl"})


async def test_a_public_clients_refresh_token_is_bound_to_its_key(client, app, alice):
    key = DPoPClient()
    first = await kubectl_tokens(client, key)
    assert first["token_type"] == "DPoP"
    rows = await token_rows(app)
    # With no proof, or a proof of another key: refused, nothing issued, the refresh token unspent.
    assert_refused(await refresh(client, first["refresh_token"], None))
    assert_refused(await refresh(client, first["refresh_token"], DPoPClient().proof("POST", TOKEN)), "invalid_grant")
    assert await token_rows(app) == rows
    second = await refresh(client, first["refresh_token"], key.proof("POST", TOKEN))
    assert second.status_code == 200, second.text
    assert second.json()["token_type"] == "DPoP"
    claims = jwt_claims((await app.state.iam.token.access_tokens.live(second.json()["access_token"])).jwt)
    assert claims["cnf"] == {"jkt": key.jkt}
    # And its successor too.
    assert_refused(await refresh(client, second.json()["refresh_token"], None))


async def test_an_unbound_grant_refreshes_without_a_proof(client, alice):
    first = await kubectl_tokens(client, None)
    assert first["token_type"] == "Bearer"
    response = await refresh(client, first["refresh_token"], None)
    assert response.status_code == 200 and response.json()["token_type"] == "Bearer"


# -- server nonces (§8) -----------------------------------------------------------------------------------------
@pytest.fixture
def nonce_settings(tmp_path, store_urls):
    return make_settings(tmp_path, store_urls, clients=dpop_clients(), dpop={"require_nonce": True})


async def test_a_nonce_is_required_when_configured(nonce_settings):
    import httpx

    from iam.app import create_app
    application = create_app(nonce_settings)
    async with application.router.lifespan_context(application):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url=ISSUER) as http:
            first = await client_credentials(http, KEY.proof("POST", TOKEN))
            assert_refused(first, "use_dpop_nonce")
            nonce = first.headers["DPoP-Nonce"]
            assert_refused(await client_credentials(http, KEY.proof("POST", TOKEN, nonce="stale")), "use_dpop_nonce")
            assert await token_rows(application) == 0
            second = await client_credentials(http, KEY.proof("POST", TOKEN, nonce=nonce))
            assert second.status_code == 200 and second.json()["token_type"] == "DPoP"
            assert second.headers["DPoP-Nonce"]  # §8.2: the nonce to use next
            token = second.json()["access_token"]
            # At forward-auth the same: use_dpop_nonce with a fresh nonce in DPoP-Nonce (§9), then accepted.
            auth = {"Authorization": f"DPoP {token}", **original()}
            first = await http.get("/oauth/v2/phantom", headers={**auth, "DPoP": KEY.proof("GET", API,
                                                                                          access_token=token)})
            assert first.status_code == 401 and first.headers["WWW-Authenticate"].startswith(
                'DPoP error="use_dpop_nonce"')
            resource_nonce = first.headers["DPoP-Nonce"]
            # A nonce two windows old has expired.
            nonces = application.state.iam.token.dpop.nonces
            expired = nonces.for_window(int(time.time()) // nonces.lifetime - 2)
            stale = await http.get("/oauth/v2/phantom", headers={**auth, "DPoP": KEY.proof(
                "GET", API, access_token=token, nonce=expired)})
            assert stale.status_code == 401 and 'error="use_dpop_nonce"' in stale.headers["WWW-Authenticate"]
            ok = await http.get("/oauth/v2/phantom", headers={**auth, "DPoP": KEY.proof(
                "GET", API, access_token=token, nonce=resource_nonce)})
            assert ok.status_code == 200, ok.text


# -- forward-auth and userinfo (§7) -----------------------------------------------------------------------------
API = "https://api.test/orders/7"
USERINFO = f"{ISSUER}/oauth/v2/userinfo"


def original(method: str = "GET", url: str = API) -> dict[str, str]:
    return {"X-Original-Method": method, "X-Original-URL": url}


async def bound_token(http, key: DPoPClient) -> str:
    response = await client_credentials(http, key.proof("POST", TOKEN))
    assert response.json()["token_type"] == "DPoP"
    return response.json()["access_token"]


async def test_forward_auth_hands_out_the_jwt_for_a_proven_dpop_token(client):
    key = DPoPClient()
    token = await bound_token(client, key)
    proof = key.proof("GET", API + "?q=1", access_token=token)
    response = await client.get("/oauth/v2/phantom",
                                headers={"Authorization": f"DPoP {token}", "DPoP": proof, **original(url=API + "?q=1")})
    assert response.status_code == 200, response.text
    assert jwt_claims(response.headers["Authorization"].removeprefix("Bearer "))["cnf"] == {"jkt": key.jkt}


async def test_forward_auth_refuses_a_dpop_token_without_its_proof(client):
    key = DPoPClient()
    token = await bound_token(client, key)
    used = key.proof("GET", API, access_token=token)
    assert (await client.get("/oauth/v2/phantom", headers={"Authorization": f"DPoP {token}", "DPoP": used,
                                                           **original()})).status_code == 200
    cases = {
        "as-bearer": ({"Authorization": f"Bearer {token}"}, "invalid_token"),
        "no-proof": ({"Authorization": f"DPoP {token}", **original()}, "invalid_dpop_proof"),
        "replayed": ({"Authorization": f"DPoP {token}", "DPoP": used, **original()}, "invalid_dpop_proof"),
        "wrong-htm": ({"Authorization": f"DPoP {token}", "DPoP": key.proof("POST", API, access_token=token),
                       **original()}, "invalid_dpop_proof"),
        "wrong-htu": ({"Authorization": f"DPoP {token}", "DPoP": key.proof("GET", API + "/x", access_token=token),
                       **original()}, "invalid_dpop_proof"),
        "old-iat": ({"Authorization": f"DPoP {token}", "DPoP": key.proof("GET", API, access_token=token,
                                                                         iat=int(time.time()) - 3600),
                     **original()}, "invalid_dpop_proof"),
        "wrong-ath": ({"Authorization": f"DPoP {token}", "DPoP": key.proof("GET", API, access_token="y" * 43),
                       **original()}, "invalid_dpop_proof"),
        "no-ath": ({"Authorization": f"DPoP {token}", "DPoP": key.proof("GET", API), **original()},
                   "invalid_dpop_proof"),
        "other-key": ({"Authorization": f"DPoP {token}", "DPoP": DPoPClient().proof("GET", API, access_token=token),
                       **original()}, "invalid_dpop_proof"),
        "no-original-request": ({"Authorization": f"DPoP {token}", "DPoP": key.proof("GET", API, access_token=token)},
                                "invalid_dpop_proof"),
    }
    for name, (headers, error) in cases.items():
        response = await client.get("/oauth/v2/phantom", headers=headers)
        assert response.status_code == 401, name
        challenge = response.headers["WWW-Authenticate"]
        assert challenge.startswith(f'DPoP error="{error}"') and 'algs="ES256' in challenge, (name, challenge)
        assert "authorization" not in response.headers, name


async def test_the_dpop_scheme_with_a_bearer_token_is_refused(client):
    token = (await client_credentials(client, None)).json()["access_token"]
    response = await client.get("/oauth/v2/phantom", headers={"Authorization": f"DPoP {token}", **original()})
    assert response.status_code == 401 and 'error="invalid_token"' in response.headers["WWW-Authenticate"]
    bearer = await client.get("/oauth/v2/phantom", headers={"Authorization": f"Bearer {token}"})
    assert bearer.status_code == 200  # unchanged for bearer tokens


@pytest.fixture
def forwarded_settings(tmp_path, store_urls):
    return make_settings(tmp_path, store_urls, clients=dpop_clients(),
                         dpop={"original_request_headers": "x-forwarded"})


async def test_forward_auth_reads_x_forwarded_headers_when_configured(forwarded_settings):
    import httpx

    from iam.app import create_app
    application = create_app(forwarded_settings)
    key = DPoPClient()
    forwarded = {"X-Forwarded-Method": "PUT", "X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.test",
                 "X-Forwarded-Uri": "/orders/7?x=y"}
    async with application.router.lifespan_context(application):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application), base_url=ISSUER) as http:
            token = await bound_token(http, key)
            ok = await http.get("/oauth/v2/phantom", headers={
                "Authorization": f"DPoP {token}", "DPoP": key.proof("PUT", API, access_token=token), **forwarded})
            assert ok.status_code == 200, ok.text
            # X-Original-* is not read in this mode.
            refused = await http.get("/oauth/v2/phantom", headers={
                "Authorization": f"DPoP {token}", "DPoP": key.proof("GET", API, access_token=token), **original()})
            assert refused.status_code == 401


async def test_userinfo_checks_the_proof_of_a_dpop_bound_token(client, alice):
    key = DPoPClient()
    tokens = await kubectl_tokens(client, key)
    token = tokens["access_token"]
    ok = await client.get("/oauth/v2/userinfo", headers={
        "Authorization": f"DPoP {token}", "DPoP": key.proof("GET", USERINFO, access_token=token)})
    assert ok.status_code == 200 and ok.json()["sub"] == alice
    for headers in (
        {"Authorization": f"Bearer {token}"},
        {"Authorization": f"DPoP {token}"},
        {"Authorization": f"DPoP {token}", "DPoP": key.proof("POST", USERINFO, access_token=token)},
        {"Authorization": f"DPoP {token}", "DPoP": DPoPClient().proof("GET", USERINFO, access_token=token)},
    ):
        response = await client.get("/oauth/v2/userinfo", headers=headers)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("DPoP error=")


# -- dpop_jkt at authorize and PAR (§10) ------------------------------------------------------------------------
async def redeem_code(http, params: dict, verifier: str, proof: str | None, client_id: str = "kubectl",
                      redirect_uri: str = KUBECTL_CALLBACK):
    headers = {"DPoP": proof} if proof else {}
    data = {"grant_type": "authorization_code", "code": params["code"], "redirect_uri": redirect_uri,
            "code_verifier": verifier}
    if client_id in SECRETS:
        headers.update(basic(client_id))
    else:
        data["client_id"] = client_id
    return await http.post("/oauth/v2/token", headers=headers, data=data)


async def test_dpop_jkt_binds_the_code_to_the_key(client, app, alice):
    key = DPoPClient()
    params, verifier, _ = await code_flow(client, "kubectl", KUBECTL_CALLBACK, scope="openid", dpop_jkt=key.jkt)
    assert_refused(await redeem_code(client, params, verifier, None))
    assert_refused(await redeem_code(client, params, verifier, DPoPClient().proof("POST", TOKEN)), "invalid_grant")
    assert await token_rows(app) == 0  # and the code is still unspent:
    response = await redeem_code(client, params, verifier, key.proof("POST", TOKEN))
    assert response.status_code == 200 and response.json()["token_type"] == "DPoP"


async def test_a_malformed_dpop_jkt_is_refused_at_authorize(client, alice):
    from tests.oauth import authorize, query
    response = await authorize(client, "kubectl", KUBECTL_CALLBACK, "openid", "x" * 43, dpop_jkt="short")
    assert response.status_code in (302, 303) and query(response.headers["location"])["error"] == "invalid_request"


async def test_a_proof_at_par_binds_the_code_of_a_confidential_client(client, app, alice):
    """§10.1: the DPoP header at the pushed authorization request."""
    from tests.oauth import follow, pkce, query, sign_in
    key = DPoPClient()
    verifier, challenge = pkce()
    form = {"response_type": "code", "redirect_uri": WEBAPP_CALLBACK, "scope": "openid", "code_challenge": challenge,
            "code_challenge_method": "S256"}
    par = f"{ISSUER}/oauth/v2/par"
    mismatch = await client.post("/oauth/v2/par", data={**form, "dpop_jkt": DPoPClient().jkt},
                                 headers={**basic("webapp"), "DPoP": key.proof("POST", par)})
    assert_refused(mismatch)
    pushed = await client.post("/oauth/v2/par", data=form, headers={**basic("webapp"), "DPoP": key.proof("POST", par)})
    assert pushed.status_code == 201, pushed.text
    start = await client.get("/oauth/v2/authorize", params={"client_id": "webapp",
                                                            "request_uri": pushed.json()["request_uri"]})
    page = await follow(client, start, "https://app.test/")
    params = query((await follow(client, await sign_in(client, page), "https://app.test/")).headers["location"])
    assert_refused(await redeem_code(client, params, verifier, None, "webapp", WEBAPP_CALLBACK))
    assert await token_rows(app) == 0
    response = await redeem_code(client, params, verifier, key.proof("POST", TOKEN), "webapp", WEBAPP_CALLBACK)
    assert response.status_code == 200 and response.json()["token_type"] == "DPoP"
    # A confidential client's refresh token is bound by its authentication, not the key (§5).
    refreshed = await client.post("/oauth/v2/token", headers=basic("webapp"), data={
        "grant_type": "refresh_token", "refresh_token": response.json()["refresh_token"]})
    assert refreshed.status_code == 200 and refreshed.json()["token_type"] == "Bearer"
