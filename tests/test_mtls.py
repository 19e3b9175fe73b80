"""Mutual TLS (RFC 8705) through the real ASGI app, on SQLite and PostgreSQL: client authentication by
certificate (tls_client_auth by subject DN or SAN, §2.1; self_signed_tls_client_auth by registered key, §2.2),
certificate-bound access tokens (§3) at forward-auth and userinfo, a public client's refresh tokens bound to its
certificate (§4), and the certificate header believed only from a trusted proxy. Then a real `iam serve`
terminating TLS itself and asking for client certificates. Every refused request is checked to issue nothing."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from cryptography import x509
from pydantic import ValidationError
from sqlalchemy import func, select

from iam.config import ClientConfig, Settings
from iam.formats import jwt_claims
from iam.token.mtls import from_header
from iam.token.store import access_tokens
from tests.conftest import ISSUER, client_config, make_settings
from tests.dpop import DPoPClient
from tests.oauth import code_flow
from tests.pki import Credential, TestCA, self_signed
from tests.postgres import free_port
from tests.server import terminate, token_role_env

HEADER = "ssl-client-cert"
CALLBACK = "http://127.0.0.1/callback"


class Pki:
    def __init__(self, directory: Path) -> None:
        self.ca = TestCA(directory / "ca")
        self.dn = self.ca.client("svc-dn", "CN=svc-dn,O=Example")
        self.dn_only = self.ca.client("svc-dn-only", "CN=svc-dn,O=Example", [])  # no SAN: the DN is enough
        self.wrong_dn = self.ca.client("other-dn", "CN=intruder,O=Example")
        self.san = self.ca.client("svc-san", "CN=anything", [x509.DNSName("svc.clients.test")])
        self.wrong_san = self.ca.client("other-san", "CN=anything", [x509.DNSName("other.clients.test")])
        # The right subject, from a CA nobody trusts: a proxy asking for any certificate would pass it on.
        self.forged = TestCA(directory / "rogue", "rogue CA").client("forged", "CN=svc-dn,O=Example")
        self.self_signed = self_signed(directory / "self", "svc-self")
        self.other_self_signed = self_signed(directory / "self", "other-self")
        self.public = self.ca.client("cli", "CN=cli,O=Example")


def mtls_clients(pki: Pki) -> list[dict]:
    return [
        {"client_id": "svc-dn", "token_endpoint_auth_method": "tls_client_auth", "grant_types": ["client_credentials"],
         "tls_client_auth_subject_dn": "CN=svc-dn,O=Example", "tls_client_certificate_bound_access_tokens": True,
         "scope": "api:read", "audience": ["https://api.test"], "introspection": {"audiences": ["https://api.test"]}},
        {"client_id": "svc-san", "token_endpoint_auth_method": "tls_client_auth", "grant_types": ["client_credentials"],
         "tls_client_auth_san_dns": "SVC.clients.test"},  # DNS names compare without regard to case
        {"client_id": "svc-self", "token_endpoint_auth_method": "self_signed_tls_client_auth",
         "grant_types": ["client_credentials"], "jwks": {"keys": [pki.self_signed.jwk]},
         "tls_client_certificate_bound_access_tokens": True},
        {"client_id": "svc-plain", "client_secret": "plain-secret-0123456789abcdef",
         "grant_types": ["client_credentials"]},
        {"client_id": "cli", "token_endpoint_auth_method": "none", "application_type": "native",
         "grant_types": ["authorization_code", "refresh_token"], "redirect_uris": [CALLBACK],
         "scope": "openid profile", "tls_client_certificate_bound_access_tokens": True},
    ]


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def settings(tmp_path, store_urls, pki):
    return make_settings(tmp_path, store_urls, clients=[*client_config(), *mtls_clients(pki)],
                         mtls={"trusted_proxies": ["127.0.0.1/32"], "ca_file": str(pki.ca.path)})


@pytest.fixture
async def untrusted(app):
    """A client calling from an address that is not one of mtls.trusted_proxies."""
    transport = httpx.ASGITransport(app=app, client=("192.0.2.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url=ISSUER) as http:
        yield http


async def token_rows(app) -> int:
    async with app.state.iam.token.store.engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(access_tokens))).scalar_one()


def presenting(credential: Credential | None, form: str = "escaped_pem") -> dict[str, str]:
    return {} if credential is None else {HEADER: getattr(credential, form)}


async def mtls_token(http, client_id: str, credential: Credential | None, **form) -> httpx.Response:
    return await http.post("/oauth/v2/token", data={"grant_type": "client_credentials", "client_id": client_id,
                                                    **form}, headers=presenting(credential))


def assert_invalid_client(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "invalid_client"
    assert "access_token" not in response.json()


async def phantom(http, token: str, credential: Credential | None) -> httpx.Response:
    return await http.get("/oauth/v2/phantom", headers={"Authorization": f"Bearer {token}",
                                                        **presenting(credential)})


def assert_invalid_token(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="iam", error="invalid_token"')
    assert "authorization" not in response.headers  # no JWT handed out


# -- client authentication (§2) -----------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["escaped_pem", "der_base64"])
async def test_tls_client_auth_by_subject_dn_binds_the_token_to_the_certificate(client, app, pki, form):
    """§2.1.2 subject DN; §3.1: cnf.x5t#S256 in the JWT and in introspection; token_type stays Bearer."""
    response = await client.post("/oauth/v2/token", data={"grant_type": "client_credentials", "client_id": "svc-dn"},
                                 headers=presenting(pki.dn, form))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["token_type"] == "Bearer"
    live = await app.state.iam.token.access_tokens.live(body["access_token"])
    assert jwt_claims(live.jwt)["cnf"] == {"x5t#S256": pki.dn.x5t}
    # introspection authenticates its caller too: svc-dn by its certificate
    introspected = await client.post("/oauth/v2/introspect",
                                     data={"token": body["access_token"], "client_id": "svc-dn"},
                                     headers=presenting(pki.dn))
    assert introspected.status_code == 200, introspected.text
    assert introspected.json()["cnf"] == {"x5t#S256": pki.dn.x5t}
    assert introspected.json()["token_type"] == "Bearer"


async def test_tls_client_auth_by_subject_dn_needs_no_san(client, pki):
    response = await mtls_token(client, "svc-dn", pki.dn_only)
    assert response.status_code == 200, response.text


async def test_tls_client_auth_by_san_dns(client, app, pki):
    response = await mtls_token(client, "svc-san", pki.san)
    assert response.status_code == 200, response.text
    live = await app.state.iam.token.access_tokens.live(response.json()["access_token"])
    assert "cnf" not in jwt_claims(live.jwt)  # the client is not registered for bound tokens: a bearer token


@pytest.mark.parametrize(("client_id", "which"), [
    ("svc-dn", "wrong_dn"),  # another subject, from the trusted CA
    ("svc-dn", "forged"),  # the registered subject, from an untrusted CA
    ("svc-dn", "self_signed"),
    ("svc-san", "wrong_san"),
    ("svc-self", "other_self_signed"),  # a key not in the client's jwks
    ("svc-self", "dn"),
    ("svc-dn", None),  # no certificate at all
])
async def test_a_certificate_that_does_not_match_the_registration_is_invalid_client(client, app, pki, client_id,
                                                                                   which):
    """§2: invalid_client, nothing issued."""
    rows = await token_rows(app)
    assert_invalid_client(await mtls_token(client, client_id, getattr(pki, which) if which else None))
    assert await token_rows(app) == rows


async def test_self_signed_tls_client_auth_by_registered_key(client, app, pki):
    """§2.2: the certificate's public key is one of the client's jwks; the token is bound to the certificate."""
    response = await mtls_token(client, "svc-self", pki.self_signed)
    assert response.status_code == 200, response.text
    live = await app.state.iam.token.access_tokens.live(response.json()["access_token"])
    assert jwt_claims(live.jwt)["cnf"] == {"x5t#S256": pki.self_signed.x5t}


async def test_the_certificate_header_from_an_untrusted_address_is_ignored(untrusted, app, pki):
    """Only mtls.trusted_proxies may say which certificate the client presented: from anyone else the header
    counts for nothing, so the client is unauthenticated."""
    rows = await token_rows(app)
    assert_invalid_client(await mtls_token(untrusted, "svc-dn", pki.dn))
    assert await token_rows(app) == rows


async def test_a_certificate_bound_client_gets_no_dpop_bound_token_instead(client, app, pki):
    rows = await token_rows(app)
    proof = DPoPClient().proof("POST", f"{ISSUER}/oauth/v2/token")
    response = await client.post("/oauth/v2/token", data={"grant_type": "client_credentials", "client_id": "svc-dn"},
                                 headers={**presenting(pki.dn), "DPoP": proof})
    assert response.status_code == 400 and response.json()["error"] == "invalid_request", response.text
    assert await token_rows(app) == rows


async def test_another_method_or_a_secret_does_not_authenticate_an_mtls_client(client, pki):
    response = await client.post("/oauth/v2/token", data={"grant_type": "client_credentials", "client_id": "svc-dn",
                                                          "client_secret": "guess"}, headers=presenting(pki.dn))
    assert_invalid_client(response)


# -- certificate-bound tokens at protected resources (§3) --------------------------------------------------------
async def test_forward_auth_passes_a_bound_token_only_with_its_certificate(client, untrusted, pki):
    token = (await mtls_token(client, "svc-dn", pki.dn)).json()["access_token"]
    passed = await phantom(client, token, pki.dn)
    assert passed.status_code == 200, passed.text
    assert jwt_claims(passed.headers["Authorization"].removeprefix("Bearer "))["cnf"] == {"x5t#S256": pki.dn.x5t}
    assert (await phantom(client, token, pki.dn)).status_code == 200  # from the cache too
    assert_invalid_token(await phantom(client, token, None))  # without the certificate
    assert_invalid_token(await phantom(client, token, pki.wrong_dn))  # with another one
    assert_invalid_token(await phantom(untrusted, token, pki.dn))  # the header from an untrusted address
    dpop = await client.get("/oauth/v2/phantom", headers={"Authorization": f"DPoP {token}", **presenting(pki.dn)})
    assert dpop.status_code == 401  # not a DPoP-bound token


async def test_a_bearer_token_still_passes_without_a_certificate(client, pki):
    response = await client.post("/oauth/v2/token", data={"grant_type": "client_credentials"},
                                 auth=("svc-plain", "plain-secret-0123456789abcdef"))
    token = response.json()["access_token"]
    assert (await phantom(client, token, None)).status_code == 200
    assert (await phantom(client, token, pki.dn)).status_code == 200


async def test_a_bound_clients_token_needs_a_certificate_even_without_mtls_authentication(client, app, alice, pki):
    """A public client registered for certificate-bound tokens (§4): no certificate, no token."""
    params, verifier, _ = await code_flow(client, "cli", CALLBACK, scope="openid")
    rows = await token_rows(app)
    response = await client.post("/oauth/v2/token", data={
        "grant_type": "authorization_code", "code": params["code"], "redirect_uri": CALLBACK,
        "code_verifier": verifier, "client_id": "cli"})
    assert response.status_code == 400 and response.json()["error"] == "invalid_request", response.text
    assert await token_rows(app) == rows


async def public_tokens(client, pki) -> dict:
    params, verifier, _ = await code_flow(client, "cli", CALLBACK, scope="openid")
    response = await client.post("/oauth/v2/token", data={
        "grant_type": "authorization_code", "code": params["code"], "redirect_uri": CALLBACK,
        "code_verifier": verifier, "client_id": "cli"}, headers=presenting(pki.public))
    assert response.status_code == 200, response.text
    return response.json()


async def refresh(client, token: str, credential: Credential | None) -> httpx.Response:
    return await client.post("/oauth/v2/token", data={"grant_type": "refresh_token", "refresh_token": token,
                                                      "client_id": "cli"}, headers=presenting(credential))


async def test_a_public_clients_refresh_token_is_bound_to_its_certificate(client, app, alice, pki):
    """§4: the refresh token only with the same certificate (grants.cnf_x5t); refused: nothing issued, unspent."""
    first = await public_tokens(client, pki)
    rows = await token_rows(app)
    for credential, error in ((None, "invalid_request"), (pki.dn, "invalid_grant")):
        refused = await refresh(client, first["refresh_token"], credential)
        assert refused.status_code == 400 and refused.json()["error"] == error, refused.text
    assert await token_rows(app) == rows
    second = await refresh(client, first["refresh_token"], pki.public)
    assert second.status_code == 200, second.text
    live = await app.state.iam.token.access_tokens.live(second.json()["access_token"])
    assert jwt_claims(live.jwt)["cnf"] == {"x5t#S256": pki.public.x5t}


async def test_userinfo_answers_a_bound_token_only_with_its_certificate(client, alice, pki):
    token = (await public_tokens(client, pki))["access_token"]
    bearer = {"Authorization": f"Bearer {token}"}
    assert (await client.get("/oauth/v2/userinfo", headers={**bearer, **presenting(pki.public)})).status_code == 200
    for credential in (None, pki.dn):
        refused = await client.get("/oauth/v2/userinfo", headers={**bearer, **presenting(credential)})
        assert_invalid_token(refused)


# -- the header's forms, discovery, configuration ----------------------------------------------------------------
def test_the_certificate_header_forms_of_nginx_caddy_traefik_and_envoy(tmp_path):
    credential = TestCA(tmp_path).client("c", "CN=c")
    envoy = (f'By=spiffe://cluster.local/ns/a/sa/b;Hash=abc;Cert="{credential.escaped_pem}";'
             'Subject="CN=c,O=Example";URI=spiffe://cluster.local/ns/c/sa/d')
    traefik = quote(credential.der_base64, safe="") + "," + quote(credential.der_base64, safe="")  # the chain
    for value in (credential.escaped_pem, credential.der_base64, traefik, envoy):
        assert from_header(value) == credential.certificate
    for junk in ("", "   ", "not a certificate", "%%%", envoy + "," + envoy, "A" * 20000):
        assert from_header(junk) is None


async def test_discovery_names_the_mtls_aliases_when_configured(tmp_path, store_urls):
    from iam.token.metadata import metadata
    settings = make_settings(tmp_path, store_urls, mtls={"endpoint_base": "https://mtls.iam.test"})
    document = metadata(settings, ["client_credentials"], type("Keys", (), {"jws_algorithms": ["RS256"]})())
    assert document["tls_client_certificate_bound_access_tokens"] is True
    assert document["mtls_endpoint_aliases"]["token_endpoint"] == "https://mtls.iam.test/oauth/v2/token"
    assert document["mtls_endpoint_aliases"]["userinfo_endpoint"] == "https://mtls.iam.test/oauth/v2/userinfo"
    assert "tls_client_auth" in document["token_endpoint_auth_methods_supported"]


def test_the_configuration_refuses_an_ambiguous_or_unanchored_mtls_client(tmp_path):
    base = {"client_id": "c", "token_endpoint_auth_method": "tls_client_auth", "grant_types": ["client_credentials"]}
    with pytest.raises(ValidationError, match="exactly one of"):
        ClientConfig.model_validate(base)
    with pytest.raises(ValidationError, match="exactly one of"):
        ClientConfig.model_validate({**base, "tls_client_auth_subject_dn": "CN=c", "tls_client_auth_san_dns": "c"})
    with pytest.raises(ValidationError, match="RFC 4514"):
        ClientConfig.model_validate({**base, "tls_client_auth_subject_dn": "not a DN"})
    with pytest.raises(ValidationError):
        ClientConfig.model_validate({**base, "tls_client_auth_san_ip": "999.1.1.1"})
    with pytest.raises(ValidationError, match="for tls_client_auth clients only"):
        ClientConfig.model_validate({"client_id": "c", "client_secret": "s" * 20, "tls_client_auth_san_dns": "c",
                                     "grant_types": ["client_credentials"]})
    with pytest.raises(ValidationError, match="needs jwks"):
        ClientConfig.model_validate({**base, "token_endpoint_auth_method": "self_signed_tls_client_auth"})
    with pytest.raises(ValidationError, match="not both"):
        ClientConfig.model_validate({**base, "tls_client_auth_san_dns": "c", "dpop_bound_access_tokens": True,
                                     "tls_client_certificate_bound_access_tokens": True})
    with pytest.raises(ValidationError, match="needs mtls.ca_file"):
        Settings.model_validate({"clients": [{**base, "tls_client_auth_san_dns": "c"}]})
    with pytest.raises(ValidationError):
        Settings.model_validate({"mtls": {"trusted_proxies": ["not an address"]}})


# -- a real `iam serve` terminating TLS and asking for client certificates ----------------------------------------
@contextmanager
def serve_mtls(directory: Path, pki: Pki, requirement: str):
    server = pki.ca.server()
    env = token_role_env(directory, clients=mtls_clients(pki), mtls={"ca_file": str(pki.ca.path)})
    port = free_port()
    log = open(directory / f"server-{requirement}.log", "w+")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "iam.cli", "serve", "--port", str(port), "--tls-cert", str(server.cert_path),
         "--tls-key", str(server.key_path), "--tls-client-ca", str(pki.ca.path), "--tls-client-certs", requirement],
        env={**os.environ, **env, "IAM_DRAIN_DELAY": "0"}, cwd=directory, stdout=log,
        stderr=subprocess.STDOUT)
    base = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        with httpx.Client(verify=pki.dn.context(pki.ca.path), timeout=2) as http:
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"iam serve exited with {process.returncode}: {log.read()}")
                try:
                    if http.get(f"{base}/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "iam serve did not get ready"
                time.sleep(0.1)
        yield base
    finally:
        terminate(process, 15)
        log.close()


def test_iam_serve_takes_the_certificate_from_its_own_tls_handshake(tmp_path):
    pki = Pki(tmp_path / "pki")
    with serve_mtls(tmp_path, pki, "optional") as base:
        with httpx.Client(verify=pki.dn.context(pki.ca.path), base_url=base) as with_cert:
            issued = with_cert.post("/oauth/v2/token", data={"grant_type": "client_credentials",
                                                             "client_id": "svc-dn"})
            assert issued.status_code == 200, issued.text
            token = issued.json()["access_token"]
            passed = with_cert.get("/oauth/v2/phantom", headers={"Authorization": f"Bearer {token}"})
            assert passed.status_code == 200, passed.text
            claims = jwt_claims(passed.headers["Authorization"].removeprefix("Bearer "))
            assert claims["cnf"] == {"x5t#S256": pki.dn.x5t}
            # A header is no substitute: iam trusts no proxy here, so another certificate's header counts for nothing.
            spoofed = with_cert.get("/oauth/v2/phantom", headers={"Authorization": f"Bearer {token}",
                                                                  HEADER: pki.wrong_dn.escaped_pem})
            assert spoofed.status_code == 200
        with httpx.Client(verify=pki.wrong_dn.context(pki.ca.path), base_url=base) as other:
            assert other.get("/oauth/v2/phantom", headers={"Authorization": f"Bearer {token}"}).status_code == 401
            assert other.post("/oauth/v2/token", data={"grant_type": "client_credentials",
                                                       "client_id": "svc-dn"}).status_code == 401
        with httpx.Client(verify=str(pki.ca.path), base_url=base) as without:  # optional: the handshake succeeds
            refused = without.get("/oauth/v2/phantom", headers={"Authorization": f"Bearer {token}"})
            assert refused.status_code == 401 and "invalid_token" in refused.headers["WWW-Authenticate"]
            assert without.post("/oauth/v2/token", data={"grant_type": "client_credentials",
                                                         "client_id": "svc-dn"}).json()["error"] == "invalid_client"


def test_iam_serve_can_require_a_client_certificate(tmp_path):
    pki = Pki(tmp_path / "pki")
    with serve_mtls(tmp_path, pki, "required") as base:
        with httpx.Client(verify=pki.dn.context(pki.ca.path), base_url=base) as with_cert:
            assert with_cert.get("/health/ready").status_code == 200
        with httpx.Client(verify=str(pki.ca.path), base_url=base) as without, pytest.raises(httpx.TransportError):
            without.get("/health/ready")
        rogue = ssl.create_default_context(cafile=str(pki.ca.path))
        rogue.load_cert_chain(str(pki.forged.cert_path), str(pki.forged.key_path))
        with httpx.Client(verify=rogue, base_url=base) as forged, pytest.raises(httpx.TransportError):
            forged.get("/health/ready")
