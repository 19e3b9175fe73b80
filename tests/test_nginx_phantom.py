"""The phantom-token swap at a real nginx: config/nginx/phantom-token.conf included verbatim, a real
`iam serve` (token role) behind `auth_request`, and an API upstream that records what reaches it."""

from __future__ import annotations

import base64
import importlib.util
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.conftest import ISSUER, WEBAPP_CALLBACK, basic, client_config
from tests.dpop import DPoPClient
from tests.oauth import advertised_paths
from tests.postgres import free_port
from tests.server import serve, terminate, token_role_env

NGINX = "/usr/sbin/nginx"
ROOT = Path(__file__).resolve().parent.parent
SNIPPET = ROOT / "config" / "nginx" / "phantom-token.conf"
GATEWAY = ROOT / "config" / "nginx" / "gateway.conf"
SHORT_LIVED = {
    "client_id": "short-lived",
    "client_secret": "short-lived-secret-0123456789",
    "grant_types": ["client_credentials"],
    "access_token_ttl": 2,
}


# -- harness ---------------------------------------------------------------------------------------------
@contextmanager
def nginx(directory: Path, http_block: str) -> Iterator[None]:
    """Run nginx in the foreground with everything it writes under `directory`, until the block exits."""
    if not os.path.exists(NGINX):
        raise RuntimeError(f"{NGINX} is not installed (Debian: apt-get install nginx; .ci/run does it)")
    directory.mkdir(parents=True, exist_ok=True)
    temp_paths = "\n".join(
        f"{kind}_temp_path {directory}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = directory / "nginx.conf"
    conf.write_text(f"""
        {"user root;" if os.geteuid() == 0 else ""}
        worker_processes 1;
        pid {directory}/nginx.pid;
        error_log {directory}/error.log warn;
        events {{ worker_connections 256; }}
        http {{
            access_log off;
            {temp_paths}
            {http_block}
        }}
    """)
    log = open(directory / "stderr.log", "w+")  # noqa: SIM115
    process = subprocess.Popen(
        [
            NGINX,
            "-p",
            str(directory),
            "-c",
            str(conf),
            "-e",
            str(directory / "error.log"),
            "-g",
            "daemon off;",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield
    finally:
        terminate(process)
        log.close()


def wait_for_port(port: int, process_log: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(
        f"nginx did not listen on {port}: {process_log.read_text() if process_log.exists() else ''}"
    )


@contextmanager
def gateway(directory: Path, token_port: int, api_port: int) -> Iterator[str]:
    """nginx with the snippet, verbatim, in a server whose upstreams are the token role and the API."""
    port = free_port()
    with nginx(
        directory,
        f"""
        upstream iam_token {{ server 127.0.0.1:{token_port}; keepalive 4; }}
        upstream api_backend {{ server 127.0.0.1:{api_port}; }}
        server {{
            listen 127.0.0.1:{port};
            include {SNIPPET};
        }}
    """,
    ):
        wait_for_port(port, directory / "error.log")
        yield f"http://127.0.0.1:{port}"


@contextmanager
def recording_api() -> Iterator[tuple[int, list[dict]]]:
    """An upstream API that answers 200 and records every request it receives."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            received.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": dict(self.headers.items()),
                    "body": self.rfile.read(length) if length else b"",
                }
            )
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_GET = do_POST = do_DELETE = _record

        def log_message(self, *args: object) -> None:
            pass

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as port:
        yield port, received


@contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[int]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """A token role, the recording API, and nginx with the phantom-token snippet in front of the API."""
    directory = tmp_path_factory.mktemp("phantom")
    with ExitStack() as stack:
        iam_base, _ = stack.enter_context(
            serve(token_role_env(directory, clients=[*client_config(), SHORT_LIVED]), directory)
        )
        api_port, received = stack.enter_context(recording_api())
        gateway_base = stack.enter_context(
            gateway(directory / "nginx", int(iam_base.rsplit(":", 1)[1]), api_port)
        )
        yield SimpleNamespace(directory=directory, iam=iam_base, gateway=gateway_base, received=received)


@pytest.fixture(autouse=True)
def _fresh_recording(stack):
    stack.received.clear()


def token_for(base: str, client_id: str = "svc-basic", secret: str | None = None) -> str:
    response = httpx.post(
        f"{base}/oauth/v2/token", data={"grant_type": "client_credentials"}, headers=basic(client_id, secret)
    )
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_rejected(response: httpx.Response, received: list[dict]) -> None:
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert received == [], "a request without a valid token reached the API"


# -- the swap --------------------------------------------------------------------------------------------
def test_a_valid_token_reaches_the_api_as_the_signed_jwt(stack):
    token = token_for(stack.iam)
    response = httpx.post(
        f"{stack.gateway}/orders/42?page=2",
        content=b'{"item": 7}',
        headers={**bearer(token), "Content-Type": "application/json"},
    )
    assert response.status_code == 200

    [request] = stack.received
    assert request["method"] == "POST" and request["path"] == "/orders/42?page=2"
    assert request["body"] == b'{"item": 7}'  # the auth subrequest did not consume the body
    scheme, value = request["headers"]["Authorization"].split(" ")
    assert scheme == "Bearer" and value != token
    assert not any(token in v for v in request["headers"].values()), "the opaque token reached the API"

    keys = KeySet.import_key_set(httpx.get(f"{stack.iam}/oauth/v2/jwks").json())
    decoded = jwt.decode(value, keys, algorithms=["ES256", "RS256"])
    assert decoded.header["typ"] == "at+jwt"
    jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": ISSUER},
        aud={"essential": True, "value": "https://api.test"},  # svc-basic's configured audience
        exp={"essential": True},
    ).validate(decoded.claims)
    assert decoded.claims["client_id"] == "svc-basic" and decoded.claims["scope"] == "api:read api:write"


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-token"},
        {"Authorization": "Bearer " + secrets.token_urlsafe(32)},  # well-formed, never issued
        {"Authorization": "Basic " + base64.b64encode(b"svc-basic:secret").decode()},
        {"Authorization": "Bearer"},
    ],
    ids=["none", "garbage", "unknown", "basic", "empty"],
)
def test_requests_without_a_valid_token_never_reach_the_api(stack, headers):
    assert_rejected(httpx.get(f"{stack.gateway}/orders", headers=headers), stack.received)


def test_an_expired_token_is_refused(stack):
    token = token_for(stack.iam, "short-lived", SHORT_LIVED["client_secret"])
    assert httpx.get(f"{stack.gateway}/orders", headers=bearer(token)).status_code == 200
    stack.received.clear()
    time.sleep(SHORT_LIVED["access_token_ttl"] + 1)
    response = httpx.get(f"{stack.gateway}/orders", headers=bearer(token))
    assert_rejected(response, stack.received)
    assert 'error="invalid_token"' in response.headers["WWW-Authenticate"]


def test_revocation_takes_effect_at_the_next_request(stack):
    token = token_for(stack.iam)
    assert httpx.get(f"{stack.gateway}/orders", headers=bearer(token)).status_code == 200
    stack.received.clear()
    revoked = httpx.post(f"{stack.iam}/oauth/v2/revoke", data={"token": token}, headers=basic("svc-basic"))
    assert revoked.status_code == 200
    assert_rejected(httpx.get(f"{stack.gateway}/orders", headers=bearer(token)), stack.received)


def test_an_unreachable_token_role_fails_closed(stack):
    token = token_for(stack.iam)
    with (
        recording_api() as (api_port, received),
        gateway(stack.directory / "down", free_port(), api_port) as base,
    ):
        response = httpx.get(f"{base}/orders", headers=bearer(token))
    assert response.status_code == 500 and received == []


# -- DPoP (RFC 9449 §7) through the gateway ---------------------------------------------------------------
def dpop_token(stack, key: DPoPClient) -> str:
    response = httpx.post(f"{stack.iam}/oauth/v2/token", data={"grant_type": "client_credentials"},
                          headers={**basic("svc-basic"), "DPoP": key.proof("POST", f"{ISSUER}/oauth/v2/token")})
    assert response.status_code == 200 and response.json()["token_type"] == "DPoP", response.text
    return response.json()["access_token"]


def test_a_dpop_bound_token_passes_with_a_proof_of_the_api_call(stack):
    key = DPoPClient()
    token = dpop_token(stack, key)
    url = f"{stack.gateway}/orders/42?page=2"  # htu is compared without the query (§4.3)
    proof = key.proof("DELETE", url, access_token=token)
    response = httpx.delete(url, headers={"Authorization": f"DPoP {token}", "DPoP": proof})
    assert response.status_code == 200, response.text
    [request] = stack.received
    assert request["method"] == "DELETE" and request["headers"]["Authorization"].startswith("Bearer ey")
    # The same proof again is a replay (§11.1): refused, the API not called.
    stack.received.clear()
    replay = httpx.delete(url, headers={"Authorization": f"DPoP {token}", "DPoP": proof})
    assert replay.status_code == 401 and stack.received == []
    assert replay.headers["WWW-Authenticate"].startswith('DPoP error="invalid_dpop_proof"')


def test_a_dpop_bound_token_without_its_proof_never_reaches_the_api(stack):
    key = DPoPClient()
    token = dpop_token(stack, key)
    url = f"{stack.gateway}/orders"
    for headers in (
        {"Authorization": f"Bearer {token}"},  # as a bearer token
        {"Authorization": f"Bearer {token}", "DPoP": key.proof("GET", url, access_token=token)},
        {"Authorization": f"DPoP {token}"},  # no proof
        {"Authorization": f"DPoP {token}", "DPoP": key.proof("POST", url, access_token=token)},  # another method
        {"Authorization": f"DPoP {token}", "DPoP": key.proof("GET", f"{url}/7", access_token=token)},  # URL
        {"Authorization": f"DPoP {token}", "DPoP": key.proof("GET", url, access_token="x" * 43)},  # ath
        {"Authorization": f"DPoP {token}", "DPoP": DPoPClient().proof("GET", url, access_token=token)},  # key
        # The client's own X-Original-URL is replaced by the gateway's.
        {"Authorization": f"DPoP {token}", "DPoP": key.proof("GET", "https://elsewhere.test/x", access_token=token),
         "X-Original-URL": "https://elsewhere.test/x"},
    ):
        response = httpx.get(url, headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["WWW-Authenticate"].startswith("DPoP error="), response.headers
    assert stack.received == []


# -- the compose gateway and the example API ---------------------------------------------------------
def load_echo_api():
    spec = importlib.util.spec_from_file_location("echo_api", ROOT / "examples" / "echo-api" / "echo_api.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_example_api_gets_the_claims_and_refuses_anything_else(stack):
    echo = load_echo_api()
    verifier = echo.Verifier(f"{stack.iam}/oauth/v2/jwks", ISSUER, "https://api.test")
    token = token_for(stack.iam)
    token_port = int(stack.iam.rsplit(":", 1)[1])
    with (
        serving(echo.make_server(verifier, "127.0.0.1", 0)) as api_port,
        gateway(stack.directory / "echo", token_port, api_port) as base,
    ):
        response = httpx.get(f"{base}/whoami", headers=bearer(token))
        assert response.status_code == 200, response.text
        assert response.json()["claims"]["client_id"] == "svc-basic"

        api = f"http://127.0.0.1:{api_port}"
        assert httpx.get(f"{api}/whoami", headers=bearer(token)).status_code == 401  # the opaque token: no
        # A genuine JWT for another audience ("odd:id &+" has none configured: its tokens are for the issuer).
        other = httpx.post(
            f"{stack.iam}/oauth/v2/introspect",
            data={"token": token_for(stack.iam, "odd:id &+")},
            headers={**basic("svc-basic"), "Accept": "application/jwt"},
        )
        assert other.status_code == 200 and other.text.startswith("ey")
        assert httpx.get(f"{api}/whoami", headers=bearer(other.text.strip())).status_code == 401
        assert httpx.get(f"{api}/healthz").status_code == 200


def test_the_compose_gateway_routes_only_public_endpoints_to_iam(stack):
    """config/nginx/gateway.conf, with the compose host names pointed at this test's processes."""
    port = free_port()
    token_port = stack.iam.rsplit(":", 1)[1]
    with recording_api() as (api_port, received):
        text = GATEWAY.read_text()
        for compose_value, local_value in {
            "listen 8080;": f"listen 127.0.0.1:{port};",
            "server token:8080;": f"server 127.0.0.1:{token_port};",
            "server authentication:8080;": f"server 127.0.0.1:{free_port()};",
            "server echo-api:8000;": f"server 127.0.0.1:{api_port};",
            "/etc/nginx/snippets/phantom-token.conf": str(SNIPPET),
        }.items():
            assert text.count(compose_value) == 1, compose_value
            text = text.replace(compose_value, local_value)
        with nginx(stack.directory / "gateway", text):
            wait_for_port(port, stack.directory / "gateway" / "error.log")
            base = f"http://127.0.0.1:{port}"
            token = token_for(base)  # the token endpoint, through the gateway
            assert httpx.get(f"{base}/.well-known/openid-configuration").json()["issuer"] == ISSUER
            assert httpx.get(f"{base}/oauth/v2/jwks").status_code == 200
            for path in ("/oauth/v2/phantom", "/oauth/v2/phantom/x", "/oauth/v2/tokens"):
                response = httpx.get(f"{base}{path}", headers=bearer(token))
                assert response.status_code == 404 and "authorization" not in response.headers, path
            assert received == []
            assert httpx.get(f"{base}/api/orders", headers=bearer(token)).status_code == 200
            assert received[0]["headers"]["Authorization"].startswith("Bearer ey")
            received.clear()

            # Every endpoint discovery advertises reaches the token role: the same answer as asked directly.
            advertised = advertised_paths(httpx.get(f"{base}/.well-known/openid-configuration").json())
            assert "/oauth/v2/par" in advertised
            for path in advertised:
                for method in ("GET", "POST"):
                    direct = httpx.request(method, f"{stack.iam}{path}")
                    through = httpx.request(method, f"{base}{path}")
                    assert (through.status_code, through.headers.get("content-type")) == (
                        direct.status_code, direct.headers.get("content-type")), (method, path)
            assert received == []
            # RFC 9126 through the gateway.
            pushed = httpx.post(f"{base}/oauth/v2/par", headers=basic("webapp"), data={
                "response_type": "code", "redirect_uri": WEBAPP_CALLBACK, "scope": "openid",
                "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM", "code_challenge_method": "S256"})
            assert pushed.status_code == 201, pushed.text
