"""A real `iam serve` process (SERVICE_ROLE=all, SQLite) on a loopback issuer, and a client's callback server.

Shared by the end-to-end tests that drive the server as outsiders do: a real browser
(tests/test_browser_flow.py) and an independent OIDC client library (tests/test_oidc_client_library.py).
Import the `live` fixture into a test module to use it: one server per module.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import KeySet

from tests.postgres import free_port
from tests.server import iam, serve, write_config

PASSWORD = "correct horse battery staple"
WEB_SECRET = "web-secret-" + secrets.token_urlsafe(16)
SCOPE = "openid profile email groups offline_access"
# Users made with the real CLI before the server starts: alice signs in with a password only,
# tess is the one whose account the TOTP test changes (so the other tests never meet a second factor).
USERS = {
    "alice": ["--email", "alice@example.com", "--email-verified", "--group", "admins", "--given-name",
              "Alice"],
    "tess": ["--email", "tess@example.com", "--email-verified", "--group", "developers"],
}


# -- the client's side: a loopback redirect target that records what it receives -----------------------
class Callbacks:
    """A tiny HTTP server standing in for the client's redirect URI (any port on 127.0.0.1, RFC 8252 §7.3)."""

    def __init__(self) -> None:
        self.hits: list[tuple[str, dict[str, str]]] = []
        self._lock = threading.Lock()
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                parts = urlsplit(self.path)
                with recorder._lock:
                    recorder.hits.append((parts.path, dict(parse_qsl(parts.query))))
                body = f"<!doctype html><title>client {parts.path}</title><p>received</p>".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Callbacks:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def count(self, path: str) -> int:
        with self._lock:
            return sum(1 for hit, _ in self.hits if hit == path)

    def last(self, path: str) -> dict[str, str]:
        with self._lock:
            return next(params for hit, params in reversed(self.hits) if hit == path)


# -- the server ----------------------------------------------------------------------------------------
@dataclass
class Live:
    issuer: str
    callbacks: Callbacks
    env: dict[str, str]
    cwd: Path
    subjects: dict[str, str] = field(default_factory=dict)  # username -> sub, as `iam users add` printed it

    @property
    def native_redirect(self) -> str:
        # Registered as http://127.0.0.1/callback: the port is the client's choice (RFC 8252 §7.3).
        return f"{self.callbacks.base}/callback"

    @property
    def web_redirect(self) -> str:
        return f"{self.callbacks.base}/web/callback"

    @property
    def web_logout_redirect(self) -> str:
        return f"{self.callbacks.base}/web/signed-out"

    def metadata(self) -> dict:
        return httpx.get(f"{self.issuer}/.well-known/openid-configuration", timeout=10).json()

    def redirect_for(self, client_id: str) -> str:
        if client_id == "partner":
            return f"{self.callbacks.base}/partner/callback"
        return self.native_redirect if client_id == "cli" else self.web_redirect


def clients(callbacks: Callbacks) -> list[dict]:
    return [
        {
            "client_id": "cli",
            "client_name": "Command Line",
            "token_endpoint_auth_method": "none",
            "application_type": "native",
            "grant_types": ["authorization_code", "refresh_token"],
            "redirect_uris": ["http://127.0.0.1/callback"],
            "scope": SCOPE,
        },
        {
            "client_id": "web",
            "client_name": "Web Portal",
            "client_secret": WEB_SECRET,
            "grant_types": ["authorization_code", "refresh_token"],
            "redirect_uris": [f"{callbacks.base}/web/callback"],
            "post_logout_redirect_uris": [f"{callbacks.base}/web/signed-out"],
            "scope": SCOPE,
        },
        {
            "client_id": "partner",  # a third-party application: the person is asked first
            "client_name": "Partner Portal",
            "client_secret": WEB_SECRET,
            "grant_types": ["authorization_code", "refresh_token"],
            "redirect_uris": [f"{callbacks.base}/partner/callback"],
            "scope": SCOPE,
            "require_consent": True,
        },
    ]


@pytest.fixture(scope="module")
def live(tmp_path_factory) -> Iterator[Live]:
    """One `iam serve` per module, its users created beforehand with `iam users add`."""
    with running(tmp_path_factory.mktemp("live")) as server:
        yield server


@contextlib.contextmanager
def running(directory: Path, host: str = "127.0.0.1", **settings: object) -> Iterator[Live]:
    """`iam serve` in `directory` with the test clients and users, and `settings` in its config file. `host`: the
    issuer's ("localhost" where the browser needs a domain: a WebAuthn RP ID cannot be an IP address)."""
    port = free_port()
    issuer = f"http://{host}:{port}"  # http is allowed for a loopback issuer
    with Callbacks() as callbacks:
        config = write_config(directory, issuer=issuer, clients=clients(callbacks), purge_interval=0, **settings)
        env = {
            "IAM_CONFIG": str(config),
            "SERVICE_ROLE": "all",
            "IAM_KEYS_DIR": str(directory / "keys"),
            **{f"IAM_{name.upper()}_DATABASE_URL": f"sqlite+aiosqlite:///{directory}/{name}.db"
               for name in ("authn", "token", "users")},
        }
        subjects = {}
        for username, options in USERS.items():
            added = iam("users", "add", "--username", username, *options, "--password-stdin",
                        env=env, cwd=directory, input=PASSWORD + "\n")
            assert added.returncode == 0, added.stderr
            subjects[username] = added.stdout.strip().splitlines()[-1]
        with serve(env, directory, port=port) as (base, _process):
            assert base == f"http://127.0.0.1:{port}"
            yield Live(issuer, callbacks, env, directory, subjects)


# -- OAuth helpers (the client's part, over plain HTTP) ------------------------------------------------
def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


@dataclass
class Request:
    """One authorization request as a client builds it: where to send the browser, and what to remember."""

    url: str
    client_id: str
    redirect_uri: str
    state: str
    nonce: str
    verifier: str


def authorization_request(live: Live, client_id: str = "cli", scope: str = SCOPE, **extra: str) -> Request:
    verifier, challenge = pkce()
    redirect_uri = live.redirect_for(client_id)
    state, nonce = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    params = {"client_id": client_id, "redirect_uri": redirect_uri, "response_type": "code", "scope": scope,
              "state": state, "nonce": nonce, "code_challenge": challenge, "code_challenge_method": "S256",
              **extra}
    endpoint = live.metadata()["authorization_endpoint"]
    return Request(f"{endpoint}?{urlencode(params)}", client_id, redirect_uri, state, nonce, verifier)


def redeem(live: Live, request: Request, code: str) -> httpx.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": request.redirect_uri,
            "code_verifier": request.verifier}
    auth = None
    if request.client_id in ("web", "partner"):
        auth = httpx.BasicAuth(request.client_id, WEB_SECRET)
    else:
        data["client_id"] = request.client_id
    return httpx.post(live.metadata()["token_endpoint"], data=data, auth=auth, timeout=10)


def verify_id_token(live: Live, token: str, client_id: str, nonce: str | None = None) -> dict:
    """Check an ID token against the JWKS named by discovery (OIDC Core §3.1.3.7)."""
    metadata = live.metadata()
    keys = KeySet.import_key_set(httpx.get(metadata["jwks_uri"], timeout=10).json())
    decoded = jwt.decode(token, keys, algorithms=metadata["id_token_signing_alg_values_supported"])
    claims = decoded.claims
    now = time.time()
    assert decoded.header["kid"]
    assert claims["iss"] == metadata["issuer"] == live.issuer
    assert claims["aud"] == client_id and claims["azp"] == client_id
    assert claims["exp"] > now and now - 60 < claims["iat"] <= now + 5
    assert claims["auth_time"] <= claims["iat"]
    if nonce is not None:
        assert claims["nonce"] == nonce
    return claims


# -- reading pages -------------------------------------------------------------------------------------
class _Forms(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "form":
            self.forms.append({"action": attributes.get("action") or "", "fields": {}})
        elif tag == "input" and self.forms and attributes.get("name"):
            self.forms[-1]["fields"][attributes["name"]] = attributes.get("value") or ""


def form(html: str, base_url: str, index: int = 0) -> tuple[str, dict[str, str]]:
    """The absolute action and the fields (hidden ones with their values) of a page's form."""
    parser = _Forms()
    parser.feed(html)
    found = parser.forms[index]
    return urljoin(base_url, found["action"]), dict(found["fields"])
