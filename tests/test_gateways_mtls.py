"""Mutual TLS (RFC 8705) and DPoP (RFC 9449) through real gateways: a real nginx (config/nginx/phantom-token.conf
included verbatim) and a real Caddy (config/caddy/phantom-token.caddy imported verbatim), each terminating TLS and
asking for client certificates, in front of a real `iam serve` (token role) and an API that records what reaches
it. The gateways accept any client certificate (self-signed clients too); the token role believes their
certificate header because they call from a trusted proxy address, and checks tls_client_auth certificates
against its CA itself."""

from __future__ import annotations

import os
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from iam.formats import jwt_claims
from tests.conftest import ISSUER, basic, client_config
from tests.dpop import DPoPClient
from tests.pki import Credential
from tests.postgres import free_port
from tests.server import serve, terminate, token_role_env
from tests.test_mtls import HEADER, Pki, mtls_clients
from tests.test_nginx_phantom import nginx, recording_api, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
NGINX_SNIPPET = ROOT / "config" / "nginx" / "phantom-token.conf"
CADDY_SNIPPET = ROOT / "config" / "caddy" / "phantom-token.caddy"
CADDY = shutil.which("caddy") or "/usr/bin/caddy"
GATEWAYS = ["nginx", "caddy"]


@contextmanager
def nginx_gateway(directory: Path, pki: Pki, token_port: int, api_port: int) -> Iterator[str]:
    server = pki.ca.server("nginx")
    port = free_port()
    with nginx(directory, f"""
        upstream iam_token {{ server 127.0.0.1:{token_port}; keepalive 4; }}
        upstream api_backend {{ server 127.0.0.1:{api_port}; }}
        server {{
            listen 127.0.0.1:{port} ssl;
            ssl_certificate {server.cert_path};
            ssl_certificate_key {server.key_path};
            ssl_verify_client optional_no_ca;
            location = /oauth/v2/token {{
                proxy_pass http://iam_token;
                proxy_http_version 1.1;
                proxy_set_header Connection "";
                proxy_set_header ssl-client-cert $ssl_client_escaped_cert;
            }}
            include {NGINX_SNIPPET};
        }}
    """):
        wait_for_port(port, directory / "error.log")
        yield f"https://127.0.0.1:{port}"


@contextmanager
def caddy_gateway(directory: Path, pki: Pki, token_port: int, api_port: int) -> Iterator[str]:
    if not os.path.exists(CADDY):
        pytest.skip(f"{CADDY} is not installed (Debian: apt-get install caddy; .ci/run does it)")
    server = pki.ca.server("caddy")
    port = free_port()
    directory.mkdir(parents=True, exist_ok=True)
    caddyfile = directory / "Caddyfile"
    caddyfile.write_text(f"""
{{
	admin off
	auto_https off
	storage file_system {directory}/data
	default_sni 127.0.0.1
	# The tests call by IP address, without SNI: Caddy's check that Host matches SNI would answer 421.
	servers {{
		strict_sni_host insecure_off
	}}
}}
https://127.0.0.1:{port} {{
	tls {server.cert_path} {server.key_path} {{
		client_auth {{
			mode request
		}}
	}}
	handle /oauth/v2/token {{
		reverse_proxy {{$IAM_TOKEN_UPSTREAM}} {{
			header_up Ssl-Client-Cert {{http.request.tls.client.certificate_der_base64}}
		}}
	}}
	handle {{
		import {CADDY_SNIPPET}
	}}
}}
""")
    log = open(directory / "caddy.log", "w+")  # noqa: SIM115
    env = {**os.environ, "IAM_TOKEN_UPSTREAM": f"127.0.0.1:{token_port}", "API_UPSTREAM": f"127.0.0.1:{api_port}",
           "HOME": str(directory), "XDG_DATA_HOME": str(directory / "data"),
           "XDG_CONFIG_HOME": str(directory / "config")}
    process = subprocess.Popen([CADDY, "run", "--config", str(caddyfile), "--adapter", "caddyfile"], env=env,
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, directory / "caddy.log")
        yield f"https://127.0.0.1:{port}"
    finally:
        terminate(process)
        log.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gateways")
    pki = Pki(directory / "pki")
    with ExitStack() as stack:
        env = token_role_env(directory, clients=[*client_config(), *mtls_clients(pki)],
                             mtls={"trusted_proxies": ["127.0.0.1/32"], "ca_file": str(pki.ca.path)})
        iam_base, _ = stack.enter_context(serve(env, directory))
        api_port, received = stack.enter_context(recording_api())
        token_port = int(iam_base.rsplit(":", 1)[1])
        gateways = {"nginx": stack.enter_context(nginx_gateway(directory / "nginx", pki, token_port, api_port))}
        try:
            gateways["caddy"] = stack.enter_context(caddy_gateway(directory / "caddy", pki, token_port, api_port))
        except pytest.skip.Exception:
            pass
        yield SimpleNamespace(iam=iam_base, gateways=gateways, received=received, pki=pki)


@pytest.fixture(params=GATEWAYS)
def gateway(request, stack) -> str:
    if request.param not in stack.gateways:
        pytest.skip(f"{CADDY} is not installed (Debian: apt-get install caddy; .ci/run does it)")
    stack.received.clear()
    return stack.gateways[request.param]


def tls(stack, credential: Credential | None) -> httpx.Client:
    """A client of the gateways: it trusts the test CA and presents `credential`'s certificate, or none."""
    if credential is None:
        return httpx.Client(verify=ssl.create_default_context(cafile=str(stack.pki.ca.path)), timeout=10)
    return httpx.Client(verify=credential.context(stack.pki.ca.path), timeout=10)


def token_through(gateway: str, http: httpx.Client, client_id: str) -> httpx.Response:
    return http.post(f"{gateway}/oauth/v2/token", data={"grant_type": "client_credentials", "client_id": client_id})


def bound_token(stack, gateway: str, client_id: str, credential: Credential) -> str:
    with tls(stack, credential) as http:
        response = token_through(gateway, http, client_id)
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


# -- mTLS client authentication at the token endpoint, through the gateway (§2) ------------------------------------
def test_tls_client_auth_through_the_gateway_binds_the_token(stack, gateway):
    token = bound_token(stack, gateway, "svc-dn", stack.pki.dn)
    with tls(stack, stack.pki.dn) as http:
        response = http.get(f"{gateway}/orders/7", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    [request] = stack.received
    jwt = request["headers"]["Authorization"].removeprefix("Bearer ")
    assert jwt != token and jwt_claims(jwt)["cnf"] == {"x5t#S256": stack.pki.dn.x5t}


def test_self_signed_tls_client_auth_through_the_gateway(stack, gateway):
    token = bound_token(stack, gateway, "svc-self", stack.pki.self_signed)
    with tls(stack, stack.pki.self_signed) as http:
        assert http.get(f"{gateway}/orders", headers={"Authorization": f"Bearer {token}"}).status_code == 200


@pytest.mark.parametrize(("client_id", "which"), [
    ("svc-dn", "wrong_dn"), ("svc-dn", "forged"), ("svc-self", "other_self_signed"), ("svc-dn", None)])
def test_a_certificate_that_does_not_match_is_invalid_client_through_the_gateway(stack, gateway, client_id, which):
    """The gateway asks for any certificate; a made-up one with the registered subject (forged: another CA) is
    refused by the token role's own chain check."""
    with tls(stack, getattr(stack.pki, which) if which else None) as http:
        response = token_through(gateway, http, client_id)
    assert response.status_code == 401 and response.json()["error"] == "invalid_client", response.text


def test_a_client_cannot_send_its_own_certificate_header(stack, gateway):
    """The gateway always sets the header from its TLS handshake: one the client sends never passes."""
    token = bound_token(stack, gateway, "svc-dn", stack.pki.dn)
    spoofed = {HEADER: stack.pki.dn.escaped_pem, "Ssl-Client-Cert": stack.pki.dn.escaped_pem}
    with tls(stack, None) as http:
        assert token_through(gateway, http, "svc-dn").status_code == 401
        issued = http.post(f"{gateway}/oauth/v2/token", data={"grant_type": "client_credentials",
                                                              "client_id": "svc-dn"}, headers=spoofed)
        assert issued.status_code == 401 and issued.json()["error"] == "invalid_client"
        response = http.get(f"{gateway}/orders", headers={"Authorization": f"Bearer {token}", **spoofed})
    assert response.status_code == 401 and stack.received == []


# -- certificate-bound tokens at the API, through the gateway (§3) -------------------------------------------------
def test_a_bound_token_without_its_certificate_never_reaches_the_api(stack, gateway):
    token = bound_token(stack, gateway, "svc-dn", stack.pki.dn)
    for credential in (None, stack.pki.wrong_dn, stack.pki.self_signed):
        with tls(stack, credential) as http:
            response = http.get(f"{gateway}/orders", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 401, credential
        assert response.headers["WWW-Authenticate"].startswith('Bearer realm="iam", error="invalid_token"')
    assert stack.received == []


def test_a_bearer_token_passes_with_or_without_a_certificate(stack, gateway):
    token = httpx.post(f"{stack.iam}/oauth/v2/token", data={"grant_type": "client_credentials"},
                       headers=basic("svc-basic")).json()["access_token"]
    for credential in (None, stack.pki.dn):
        with tls(stack, credential) as http:
            assert http.get(f"{gateway}/orders", headers={"Authorization": f"Bearer {token}"}).status_code == 200


def test_a_dpop_bound_token_passes_through_the_gateway_with_its_proof(stack, gateway):
    key = DPoPClient()
    issued = httpx.post(f"{stack.iam}/oauth/v2/token", data={"grant_type": "client_credentials"},
                        headers={**basic("svc-basic"), "DPoP": key.proof("POST", f"{ISSUER}/oauth/v2/token")})
    token = issued.json()["access_token"]
    url = f"{gateway}/orders/42?page=2"
    with tls(stack, None) as http:
        passed = http.delete(url, headers={"Authorization": f"DPoP {token}",
                                           "DPoP": key.proof("DELETE", url, access_token=token)})
        assert passed.status_code == 200, passed.text
        other_url = http.get(url, headers={"Authorization": f"DPoP {token}", "X-Original-URL": "https://x.test/",
                                           "DPoP": key.proof("GET", "https://x.test/", access_token=token)})
        assert other_url.status_code == 401 and other_url.headers["WWW-Authenticate"].startswith("DPoP error=")
    [request] = stack.received
    assert request["method"] == "DELETE" and jwt_claims(request["headers"]["Authorization"][7:])["cnf"] == {
        "jkt": key.jkt}


# -- the header from an address that is not a trusted proxy ---------------------------------------------------------
def test_the_certificate_header_from_an_untrusted_address_is_ignored(stack):
    """127.0.0.2 is this host too, but not in mtls.trusted_proxies (127.0.0.1/32): its header counts for nothing."""
    token = bound_token(stack, stack.gateways["nginx"], "svc-dn", stack.pki.dn)
    untrusted = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), base_url=stack.iam)
    trusted = httpx.Client(base_url=stack.iam)
    header = {HEADER: stack.pki.dn.escaped_pem}
    with untrusted, trusted:
        form = {"grant_type": "client_credentials", "client_id": "svc-dn"}
        refused = untrusted.post("/oauth/v2/token", data=form, headers=header)
        assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"
        bearer = {"Authorization": f"Bearer {token}", **header}
        assert untrusted.get("/oauth/v2/phantom", headers=bearer).status_code == 401
        assert trusted.get("/oauth/v2/phantom", headers=bearer).status_code == 200  # the same, from the proxy
