"""Clients without static secrets: private_key_jwt (RFC 7523 §2.2 and §3, OpenID Connect Core §9), Kubernetes
service-account tokens and SPIFFE JWT-SVIDs as client assertions (workload_identity), on SQLite and PostgreSQL.

Every refusal is checked to have issued nothing: no access-token row."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import pytest
from joserfc import jwt
from sqlalchemy import func, select

from iam.token.client_assertions import MAX_ASSERTION_LIFETIME
from iam.token.store import access_tokens, assertion_jtis
from tests.assertions import ALGS, assertion, client_keys, form, public_jwks, unsigned
from tests.conftest import ISSUER, basic, client_config, make_settings
from tests.oauth import follow, pkce, query, sign_in
from tests.postgres import free_port
from tests.workload_issuer import ServiceAccountIssuer, SpiffeIssuer

TOKEN = f"{ISSUER}/oauth/v2/token"
KEYS = client_keys()
SPIFFE = SpiffeIssuer()
SPIFFE_ID = "spiffe://example.org/ns/billing/sa/worker"
WEB_CALLBACK = "https://signer.test/cb"


@pytest.fixture(scope="module")
def down_kube():
    """A cluster whose issuer answers 503 (its control plane unreachable from iam)."""
    with ServiceAccountIssuer() as issuer:
        issuer.down = True
        yield issuer


@pytest.fixture
def settings(tmp_path, store_urls, kube, down_kube):
    bundle = SPIFFE.write_bundle(tmp_path / "bundle.json")
    service = {"grant_types": ["client_credentials"], "scope": "api:read api:write"}
    clients = [
        *client_config(),
        {"client_id": "signer", "token_endpoint_auth_method": "private_key_jwt", "jwks": public_jwks(KEYS),
         "audience": ["https://api.test", "https://billing.test"], "introspection": {"audiences": ["https://api.test"]},
         **service},
        {"client_id": "signer-web", "token_endpoint_auth_method": "private_key_jwt", "jwks": public_jwks(KEYS),
         "grant_types": ["authorization_code"], "redirect_uris": [WEB_CALLBACK], "scope": "openid email"},
        {"client_id": "remote-signer", "token_endpoint_auth_method": "private_key_jwt",
         "jwks_uri": f"{kube.issuer}/openid/v1/jwks", **service},
        {"client_id": "unreachable-signer", "token_endpoint_auth_method": "private_key_jwt",
         "jwks_uri": f"http://127.0.0.1:{free_port()}/jwks", **service},
        {"client_id": "billing-api", "token_endpoint_auth_method": "workload_identity", **service,
         "workload_identities": [{"issuer": kube.issuer, "subject": "system:serviceaccount:billing:api"}]},
        {"client_id": "billing-custom-aud", "token_endpoint_auth_method": "workload_identity", **service,
         "workload_identities": [{"issuer": kube.issuer, "subject": "system:serviceaccount:billing:api",
                                  "audience": "https://iam.billing.example", "jwks_uri": kube.discovery()["jwks_uri"]}]},
        {"client_id": "other-cluster", "token_endpoint_auth_method": "workload_identity", **service,
         "workload_identities": [{"issuer": down_kube.issuer, "subject": "system:serviceaccount:billing:api"}]},
        {"client_id": "spiffe-worker", "token_endpoint_auth_method": "workload_identity", **service,
         "workload_identities": [{"issuer": "spiffe://example.org", "subject": SPIFFE_ID, "jwks_file": str(bundle)}]},
    ]
    return make_settings(tmp_path, store_urls, clients=clients)


async def token_rows(app) -> int:
    async with app.state.iam.token.store.engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(access_tokens))).scalar_one()


async def request_token(client, data, **params):
    return await client.post("/oauth/v2/token", data={"grant_type": "client_credentials", **data, **params})


def signed(alg="RS256", client_id="signer", audience=TOKEN, **claims) -> str:
    return assertion(KEYS[alg], client_id, audience, alg=alg, **claims)


async def refused(client, app, data, error="invalid_client", status=401):
    response = await request_token(client, data)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert await token_rows(app) == 0
    return response


# -- private_key_jwt --------------------------------------------------------------------------------------
@pytest.mark.parametrize("alg", ALGS)
async def test_private_key_jwt_gets_a_token_with_each_algorithm(client, app, alg):
    response = await request_token(client, form(signed(alg), "signer"))
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "api:read api:write"
    assert await token_rows(app) == 1


async def test_the_assertion_names_the_client_when_the_form_does_not(client):
    """RFC 7523 §3: client_id is optional, sub is the client."""
    response = await request_token(client, form(signed()))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("audience", [ISSUER, TOKEN, [TOKEN, "https://other.test"]])
async def test_the_audience_is_the_issuer_or_the_token_endpoint(client, audience):
    assert (await request_token(client, form(signed(audience=audience)))).status_code == 200


async def test_a_reused_jti_is_refused(client, app):
    """RFC 7523 §3 item 7: single use; the replay fails although everything else about it is valid."""
    once = signed()
    assert (await request_token(client, form(once))).status_code == 200
    replay = await request_token(client, form(once))
    assert replay.status_code == 401 and replay.json()["error"] == "invalid_client"
    assert await token_rows(app) == 1


async def test_used_jtis_are_purged_once_expired(client, app):
    assert (await request_token(client, form(signed()))).status_code == 200
    store = app.state.iam.token.store
    async with store.engine.connect() as conn:
        (digest, expires_at), = (await conn.execute(select(assertion_jtis.c.digest, assertion_jtis.c.expires_at))).all()
    assert len(digest) == 32  # a digest, not the jti
    assert expires_at <= time.time() + 60 + 60  # kept until the assertion expires, not longer
    await store.purge_expired(now=int(time.time()), batch=10)
    async with store.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(assertion_jtis))).scalar_one() == 1
    await store.purge_expired(now=expires_at + 1, batch=10)
    async with store.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(assertion_jtis))).scalar_one() == 0


@pytest.mark.parametrize("claims", [
    pytest.param({"now": time.time() - 3600}, id="expired"),
    pytest.param({"nbf": int(time.time()) + 600}, id="not-yet-valid-nbf"),
    pytest.param({"iat": int(time.time()) + 600}, id="issued-in-the-future"),
    pytest.param({"lifetime": MAX_ASSERTION_LIFETIME + 120}, id="lifetime-too-long"),
    pytest.param({"exp": None}, id="no-exp"),
    pytest.param({"jti": None}, id="no-jti"),
    pytest.param({"audience": "https://other.test/oauth/v2/token"}, id="wrong-aud"),
    pytest.param({"audience": f"{ISSUER}/oauth/v2/introspect"}, id="another-endpoint-aud"),
    pytest.param({"iss": "someone-else"}, id="wrong-iss"),
    pytest.param({"sub": "svc-basic"}, id="wrong-sub"),
    pytest.param({"kid": "no-such-kid"}, id="unknown-kid"),
])
async def test_bad_assertions_are_invalid_client_and_issue_nothing(client, app, claims):
    await refused(client, app, form(signed(**claims), "signer"))


async def test_a_signature_by_another_key_is_refused(client, app):
    stranger = client_keys()["RS256"]  # same kid, another key
    await refused(client, app, form(assertion(stranger, "signer", TOKEN), "signer"))


async def test_alg_none_is_refused(client, app):
    now = int(time.time())
    claims = {"iss": "signer", "sub": "signer", "aud": TOKEN, "exp": now + 60, "jti": "j-none"}
    await refused(client, app, form(unsigned(claims), "signer"))


async def test_hmac_keyed_with_the_public_key_is_refused(client, app):
    """Alg confusion: HS256 with the client's public key as the secret must not pass for its signature."""
    public_pem = KEYS["RS256"].as_pem(private=False)
    now = int(time.time())
    claims = {"iss": "signer", "sub": "signer", "aud": TOKEN, "exp": now + 60, "jti": "j-hmac"}
    signing_input = unsigned(claims).split(".")[1]
    header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": "rsa-1"}).encode()).rstrip(b"=").decode()
    mac = hmac.new(public_pem, f"{header}.{signing_input}".encode(), hashlib.sha256).digest()
    forged = f"{header}.{signing_input}." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    await refused(client, app, form(forged, "signer"))


async def test_an_alg_that_does_not_fit_the_key_is_refused(client, app):
    """ES256 named in the header, but the kid is the RSA key's."""
    now = int(time.time())
    claims = {"iss": "signer", "sub": "signer", "aud": TOKEN, "exp": now + 60, "jti": "j-fit"}
    mixed = jwt.encode({"alg": "ES256", "kid": "rsa-1"}, claims, KEYS["ES256"], algorithms=["ES256"])
    await refused(client, app, form(mixed, "signer"))


async def test_a_100_kb_assertion_is_refused_cleanly(client, app):
    huge = signed(padding="x" * 100_000)
    response = await request_token(client, form(huge, "signer"))
    assert response.status_code == 413 and response.json()["error"] == "invalid_request"
    assert await token_rows(app) == 0


async def test_an_assertion_with_a_secret_too_is_refused(client, app):
    """RFC 7521 §4.2.1: more than one client authentication mechanism."""
    response = await client.post("/oauth/v2/token", data={"grant_type": "client_credentials", **form(signed())},
                                 headers=basic("svc-basic"))
    assert response.status_code == 401 and response.json()["error"] == "invalid_client"
    await refused(client, app, {**form(signed(), "signer"), "client_secret": "x"})


async def test_garbage_and_a_wrong_assertion_type_are_refused(client, app):
    await refused(client, app, form("not-a-jwt", "signer"))
    await refused(client, app, {**form(signed(), "signer"), "client_assertion_type": "urn:x"}, "invalid_request", 400)
    await refused(client, app, {"client_assertion_type": form("x")["client_assertion_type"], "client_id": "signer"},
                  "invalid_request", 400)


async def test_a_secret_client_cannot_authenticate_by_assertion(client, app):
    await refused(client, app, form(assertion(KEYS["RS256"], "svc-basic", TOKEN), "svc-basic"))


async def test_a_private_key_jwt_client_cannot_use_a_secret_or_nothing(client, app):
    response = await client.post("/oauth/v2/token", data={"grant_type": "client_credentials"},
                                 headers=basic("signer", "guess"))
    assert response.status_code == 401
    await refused(client, app, {"client_id": "signer"})


async def test_introspection_revocation_and_par_take_the_same_assertions(client, app):
    """The aud may be the endpoint called (OIDC Core §9 names the token endpoint; the others likewise)."""
    token = (await request_token(client, form(signed()))).json()["access_token"]
    introspected = await client.post("/oauth/v2/introspect", data={
        "token": token, **form(signed(audience=f"{ISSUER}/oauth/v2/introspect"))})
    assert introspected.status_code == 200 and introspected.json()["active"] is True
    assert introspected.json()["client_id"] == "signer"
    revoked = await client.post("/oauth/v2/revoke", data={"token": token, **form(signed(audience=ISSUER))})
    assert revoked.status_code == 200
    again = await client.post("/oauth/v2/introspect", data={"token": token, **form(signed())})
    assert again.json() == {"active": False}
    replayed = await client.post("/oauth/v2/introspect", data={"token": token, **form(signed(jti="par-1"))})
    assert replayed.status_code == 200
    replayed = await client.post("/oauth/v2/revoke", data={"token": token, **form(signed(jti="par-1"))})
    assert replayed.status_code == 401 and replayed.json()["error"] == "invalid_client"
    # PAR (RFC 9126 §2): this client has no redirect URI, so the request itself is refused, after authentication.
    pushed = await client.post("/oauth/v2/par", data={"response_type": "code", **form(signed(
        audience=f"{ISSUER}/oauth/v2/par"))})
    assert pushed.status_code == 400 and pushed.json()["error"] != "invalid_client"
    unauthenticated = await client.post("/oauth/v2/par", data={"response_type": "code", **form(signed(
        audience="https://other.test"))})
    assert unauthenticated.status_code == 401


async def test_a_web_client_pushes_its_request_and_redeems_its_code_with_private_key_jwt(client, alice):
    """PAR (RFC 9126 §2) and the code grant, both authenticated by assertion (aud the PAR endpoint, then the
    issuer)."""
    verifier, challenge = pkce()
    pushed = await client.post("/oauth/v2/par", data={
        "response_type": "code", "redirect_uri": WEB_CALLBACK, "scope": "openid email", "state": "s-1",
        "code_challenge": challenge, "code_challenge_method": "S256",
        **form(signed(client_id="signer-web", audience=f"{ISSUER}/oauth/v2/par"))})
    assert pushed.status_code == 201, pushed.text
    start = await client.get("/oauth/v2/authorize", params={"client_id": "signer-web",
                                                            "request_uri": pushed.json()["request_uri"]})
    page = await follow(client, start, WEB_CALLBACK)
    done = await follow(client, await sign_in(client, page), WEB_CALLBACK)
    code = query(done.headers["location"])["code"]
    redeemed = await client.post("/oauth/v2/token", data={
        "grant_type": "authorization_code", "code": code, "redirect_uri": WEB_CALLBACK, "code_verifier": verifier,
        **form(signed(client_id="signer-web", audience=ISSUER))})
    assert redeemed.status_code == 200, redeemed.text
    assert "id_token" in redeemed.json()


async def test_keys_from_a_jwks_uri_are_fetched_once(client, app, kube):
    key, kid = kube.keys["ES256"], kube.kids["ES256"]
    before = kube.hits.get("/openid/v1/jwks", 0)
    for _ in range(3):
        signed_remote = assertion(key, "remote-signer", TOKEN, alg="ES256", kid=kid)
        assert (await request_token(client, form(signed_remote))).status_code == 200
    assert kube.hits["/openid/v1/jwks"] == before + 1


async def test_an_unreachable_jwks_is_503_not_invalid_client(client, app):
    response = await refused(client, app, form(signed(client_id="unreachable-signer")), "temporarily_unavailable",
                             503)
    assert response.headers["retry-after"]


async def test_discovery_advertises_what_is_accepted(client):
    meta = (await client.get("/.well-known/openid-configuration")).json()
    for endpoint in ("token", "introspection", "revocation"):
        assert "private_key_jwt" in meta[f"{endpoint}_endpoint_auth_methods_supported"]
        algs = meta[f"{endpoint}_endpoint_auth_signing_alg_values_supported"]
        assert set(algs) == set(ALGS) and not {"none", "HS256"} & set(algs)


# -- Kubernetes service-account tokens (workload_identity) ------------------------------------------------
@pytest.mark.parametrize("alg", ["RS256", "ES256"])
async def test_a_projected_service_account_token_authenticates_its_client(client, app, kube, alg):
    token = kube.token("billing", "api", [ISSUER], alg=alg)
    response = await request_token(client, form(token, "billing-api"), scope="api:read")
    assert response.status_code == 200, response.text
    introspected = await client.post("/oauth/v2/introspect", data={"token": response.json()["access_token"]},
                                     headers=basic("svc-basic"))
    assert introspected.json()["client_id"] == "billing-api" and introspected.json()["sub"] == "billing-api"
    # The pod holds one token for most of its lifetime (the kubelet rotates it at 80 %): it is not single use.
    assert (await request_token(client, form(token, "billing-api"))).status_code == 200
    assert kube.hits["/.well-known/openid-configuration"] >= 1


async def test_a_token_without_pod_binding_and_a_configured_audience(client, kube):
    token = kube.token("billing", "api", ["https://iam.billing.example"], pod=None)
    assert (await request_token(client, form(token, "billing-custom-aud"))).status_code == 200


@pytest.mark.parametrize("case", [
    "other-service-account", "other-namespace-claim", "other-account-claim", "wrong-aud", "default-apiserver-aud",
    "expired", "not-yet-valid", "other-issuer", "unknown-kid", "no-kubernetes-claim", "malformed-pod",
])
async def test_bad_service_account_tokens_are_invalid_client(client, app, kube, case):
    now = time.time()
    tokens = {
        "other-service-account": lambda: kube.token("billing", "worker", [ISSUER]),
        "other-namespace-claim": lambda: kube.token("billing", "api", [ISSUER], **{"kubernetes.io": {
            "namespace": "default", "serviceaccount": {"name": "api", "uid": "u-1"}}}),
        "other-account-claim": lambda: kube.token("billing", "api", [ISSUER], **{"kubernetes.io": {
            "namespace": "billing", "serviceaccount": {"name": "worker", "uid": "u-1"}}}),
        "wrong-aud": lambda: kube.token("billing", "api", ["https://other-iam.test"]),
        "default-apiserver-aud": lambda: kube.token("billing", "api", ["https://kubernetes.default.svc"]),
        "expired": lambda: kube.token("billing", "api", [ISSUER], now=now - 7200),
        "not-yet-valid": lambda: kube.token("billing", "api", [ISSUER], nbf=int(now) + 600),
        "other-issuer": lambda: kube.token("billing", "api", [ISSUER], iss="https://kubernetes.default.svc"),
        "unknown-kid": lambda: jwt.encode({"alg": "RS256", "kid": "unknown"}, {
            "iss": kube.issuer, "sub": "system:serviceaccount:billing:api", "aud": [ISSUER], "exp": int(now) + 600,
            "kubernetes.io": {"namespace": "billing", "serviceaccount": {"name": "api", "uid": "u"}}},
            client_keys()["RS256"], algorithms=["RS256"]),
        "no-kubernetes-claim": lambda: kube.token("billing", "api", [ISSUER], **{"kubernetes.io": None}),
        "malformed-pod": lambda: kube.token("billing", "api", [ISSUER], **{"kubernetes.io": {
            "namespace": "billing", "serviceaccount": {"name": "api", "uid": "u-1"}, "pod": "api-1"}}),
    }
    await refused(client, app, form(tokens[case](), "billing-api"))


async def test_an_unknown_kid_refetches_the_keys_at_most_once_per_interval(client, app, kube):
    good = kube.token("billing", "api", [ISSUER])
    assert (await request_token(client, form(good, "billing-api"))).status_code == 200
    fetched = kube.hits["/openid/v1/jwks"]
    kube.rotate("RS256")  # the cluster's key rotated: the first unknown kid fetches the JWKS again
    rotated = kube.token("billing", "api", [ISSUER])
    assert (await request_token(client, form(rotated, "billing-api"))).status_code == 200
    assert kube.hits["/openid/v1/jwks"] == fetched + 1
    for _ in range(5):  # a flood of forged kids: no more fetches
        forged = jwt.encode({"alg": "RS256", "kid": f"forged-{_}"}, {"iss": kube.issuer, "sub": "x"},
                            client_keys()["RS256"], algorithms=["RS256"])
        forged_form = form(forged, "billing-api")
        response = await request_token(client, forged_form)
        assert response.status_code == 401
    assert kube.hits["/openid/v1/jwks"] == fetched + 1


async def test_an_unreachable_cluster_issuer_is_503(client, app, down_kube):
    token = down_kube.token("billing", "api", [ISSUER])
    await refused(client, app, form(token, "other-cluster"), "temporarily_unavailable", 503)
    # it fails fast while down: one fetch for several requests
    hits = sum(down_kube.hits.values())
    await refused(client, app, form(token, "other-cluster"), "temporarily_unavailable", 503)
    assert sum(down_kube.hits.values()) == hits


async def test_a_workload_token_is_for_its_client_only(client, app, kube):
    token = kube.token("billing", "api", [ISSUER])
    await refused(client, app, form(token, "spiffe-worker"))
    await refused(client, app, form(token, "signer"))
    await refused(client, app, form(token))  # no client_id: the sub names no client


# -- SPIFFE JWT-SVIDs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("alg", ["ES256", "RS256"])
async def test_a_jwt_svid_authenticates_with_the_trust_bundle(client, alg):
    svid = SPIFFE.svid("/ns/billing/sa/worker", [ISSUER], alg=alg)
    response = await request_token(client, form(svid, "spiffe-worker"))
    assert response.status_code == 200, response.text


async def test_bad_jwt_svids_are_refused(client, app):
    await refused(client, app, form(SPIFFE.svid("/ns/billing/sa/other", [ISSUER]), "spiffe-worker"))
    await refused(client, app, form(SPIFFE.svid("/ns/billing/sa/worker", ["https://other.test"]), "spiffe-worker"))
    await refused(client, app, form(SpiffeIssuer().svid("/ns/billing/sa/worker", [ISSUER]), "spiffe-worker"))
    await refused(client, app, form(SPIFFE.svid("/ns/billing/sa/worker", [ISSUER], ttl=-3600), "spiffe-worker"))


# -- resource indicators (RFC 8707) -----------------------------------------------------------------------
async def test_resource_selects_the_audience(client, app):
    response = await request_token(client, form(signed()), resource="https://billing.test")
    assert response.status_code == 200, response.text
    introspected = await client.post("/oauth/v2/introspect", data={"token": response.json()["access_token"]},
                                     headers=basic("svc-basic"))
    assert introspected.json()["aud"] == "https://billing.test"
    plain = await request_token(client, form(signed()))
    introspected = await client.post("/oauth/v2/introspect", data={"token": plain.json()["access_token"]},
                                     headers=basic("svc-basic"))
    assert introspected.json()["aud"] == ["https://api.test", "https://billing.test"]


@pytest.mark.parametrize("resource", ["https://other.test", "https://api.test/#frag", "not a uri"])
async def test_an_unknown_resource_is_invalid_target(client, app, resource):
    await refused(client, app, form(signed()) | {"resource": resource}, "invalid_target", 400)


# -- configuration ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("client", "message"), [
    ({"token_endpoint_auth_method": "private_key_jwt"}, "needs jwks or jwks_uri"),
    ({"token_endpoint_auth_method": "private_key_jwt", "jwks": {"keys": [KEYS["ES256"].as_dict(private=True)]}},
     "public keys only"),
    ({"token_endpoint_auth_method": "private_key_jwt", "jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}},
     "public keys only"),
    ({"token_endpoint_auth_method": "private_key_jwt", "jwks_uri": "http://keys.example/jwks"}, "https"),
    ({"token_endpoint_auth_method": "private_key_jwt", "jwks": public_jwks(KEYS), "client_secret": "s3cret-s3cret"},
     "no client secret"),
    ({"jwks": public_jwks(KEYS), "client_secret": "s3cret-s3cret"}, "only private_key_jwt"),
    ({"token_endpoint_auth_method": "workload_identity"}, "needs workload_identities"),
    ({"token_endpoint_auth_method": "workload_identity", "workload_identities": [
        {"issuer": "https://k8s.example", "subject": "system:serviceaccount:billing"}]}, "namespace"),
    ({"token_endpoint_auth_method": "workload_identity", "workload_identities": [
        {"issuer": "https://k8s.example", "subject": "system:serviceaccount:b:a", "jwks_uri": "https://k8s.example/j",
         "jwks_file": "/keys.json"}]}, "not both"),
    ({"token_endpoint_auth_method": "workload_identity", "workload_identities": [
        {"issuer": "spiffe://example.org", "subject": SPIFFE_ID}]}, "trust bundle"),
    ({"token_endpoint_auth_method": "workload_identity", "workload_identities": [
        {"issuer": "spiffe://example.org", "subject": "spiffe://other.org/x", "jwks_file": "/b.json"}]}, "trust domain"),
])
def test_key_based_clients_are_checked_at_load(tmp_path, client, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        make_settings(tmp_path, {}, clients=[{"client_id": "c", "grant_types": ["client_credentials"], **client}])
