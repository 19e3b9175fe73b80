"""An OpenID provider that lies: the protocol's shape, with the ID tokens a test crafts.

It stands for an attacker who controls (or sits in front of) an upstream: a real provider never signs
with `alg: none` or with its public key as an HMAC secret, so those tokens have to come from here. It
follows the code flow like a real provider: discovery, a JWKS, an authorization endpoint that redirects
straight back with a code (no sign-in page), and a token endpoint that checks the client's credentials,
the code, the redirect URI and the PKCE verifier before it answers with the test's ID token.

    with HostileProvider(client_id, client_secret) as op:
        op.issuer, op.key                      # its signing key (RSA, kid "hostile-1"), published in /jwks
        op.id_token = lambda claims: op.sign(claims, key=other_key)   # what the token endpoint returns
        op.delay["/token"] = 5                 # seconds before that path answers
        op.userinfo = {"sub": ...}             # a userinfo endpoint, advertised in discovery
        op.token_status = 500                  # the token endpoint fails
        op.drip.add("/.well-known/openid-configuration")   # answer one byte every 0.1 s
        op.requests.count("/jwks")
`claims` passed to `id_token` are the ones an honest provider would sign (iss, sub, aud, exp, iat, nonce
from the authorization request); the test changes them, or the header, or the key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from joserfc import jwt
from joserfc.jwk import RSAKey


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class HostileProvider:
    def __init__(self, client_id: str, client_secret: str) -> None:
        self.client_id, self.client_secret = client_id, client_secret
        self.key = RSAKey.generate_key(2048, parameters={"kid": "hostile-1", "alg": "RS256", "use": "sig"},
                                       private=True)
        self.published: list[RSAKey | dict] = [self.key]  # what /jwks serves (a dict as it is)
        self.algs = ["RS256", "HS256", "none"]  # advertising them does not make iam accept HMAC or none
        self.id_token: Callable[[dict[str, Any]], str] = self.sign
        self.delay: dict[str, float] = {}
        self.drip: set[str] = set()
        self.requests: list[str] = []
        self.userinfo: dict[str, Any] | None = None  # served at /userinfo (and advertised) when set
        self.token_status = 200  # what the token endpoint answers once the request checks out
        self._codes: dict[str, dict[str, str]] = {}
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.issuer = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> HostileProvider:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def sign(self, claims: dict[str, Any], key: RSAKey | None = None, header: dict[str, Any] | None = None) -> str:
        key = key or self.key
        return jwt.encode(header or {"alg": "RS256", "kid": key.kid}, claims, key, algorithms=["RS256"])

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "authorization_endpoint": self.issuer + "/authorize",
            "token_endpoint": self.issuer + "/token",
            "jwks_uri": self.issuer + "/jwks",
            "response_types_supported": ["code"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": self.algs,
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["client_secret_basic"],
            **({"userinfo_endpoint": self.issuer + "/userinfo"} if self.userinfo is not None else {}),
        }

    def _authorize(self, query: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if query.get("response_type") != "code" or query.get("client_id") != self.client_id \
                or query.get("code_challenge_method") != "S256":
            return 400, {}, b"bad authorization request"
        code = secrets.token_urlsafe(24)
        self._codes[code] = query
        back = {"code": code, "state": query.get("state", ""), "iss": self.issuer}
        return 302, {"Location": query["redirect_uri"] + "?" + urlencode(back)}, b""

    def _token(self, form: dict[str, str], authorization: str) -> tuple[int, dict[str, Any]]:
        expected = "Basic " + base64.b64encode(f"{self.client_id}:{self.client_secret}".encode()).decode()
        if authorization != expected:
            return 401, {"error": "invalid_client"}
        request = self._codes.pop(form.get("code", ""), None)
        verifier = form.get("code_verifier", "")
        if (form.get("grant_type") != "authorization_code" or request is None
                or form.get("redirect_uri") != request["redirect_uri"]
                or b64url(hashlib.sha256(verifier.encode()).digest()) != request["code_challenge"]):
            return 400, {"error": "invalid_grant"}
        if self.token_status != 200:
            return self.token_status, {"error": "server_error"}
        now = int(time.time())
        claims = {"iss": self.issuer, "sub": "mallory", "aud": self.client_id, "exp": now + 300, "iat": now,
                  "nonce": request["nonce"], "email": "mallory@evil.example", "email_verified": True}
        return 200, {"token_type": "Bearer", "access_token": secrets.token_urlsafe(24), "expires_in": 300,
                     "id_token": self.id_token(claims)}

    def _handler(self):
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):  # noqa: A002 - the stdlib's name
                pass

            def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None,
                        content_type: str = "application/json") -> None:
                path = urlsplit(self.path).path
                time.sleep(provider.delay.get(path, 0))
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                try:
                    if path in provider.drip:
                        for byte in body:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(0.1)
                    else:
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as it should

            def do_GET(self):  # noqa: N802 - the stdlib's name
                parts = urlsplit(self.path)
                provider.requests.append(parts.path)
                if parts.path == "/.well-known/openid-configuration":
                    self._answer(200, json.dumps(provider.discovery()).encode())
                elif parts.path == "/jwks":
                    keys = [key.as_dict(private=False) if isinstance(key, RSAKey) else key
                            for key in provider.published]
                    self._answer(200, json.dumps({"keys": keys}).encode())
                elif parts.path == "/userinfo" and provider.userinfo is not None:
                    self._answer(200, json.dumps(provider.userinfo).encode())
                elif parts.path == "/authorize":
                    status, headers, body = provider._authorize(dict(parse_qsl(parts.query)))
                    self._answer(status, body, headers, "text/plain")
                else:
                    self._answer(404, b"{}")

            def do_POST(self):  # noqa: N802
                parts = urlsplit(self.path)
                provider.requests.append(parts.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
                if parts.path == "/token":
                    status, document = provider._token(dict(parse_qsl(body)), self.headers.get("Authorization", ""))
                    self._answer(status, json.dumps(document).encode())
                else:
                    self._answer(404, b"{}")

        return Handler
