"""Example API behind the phantom-token gateway: it accepts only the JWT and answers with its claims.

The gateway (nginx `auth_request`, ingress-nginx `auth-url`) swaps the client's opaque token for the JWT,
so this API never calls iam per request: it verifies the signature against the token role's JWKS (fetched
once, refetched when a token names an unknown `kid`, at most every 30 s) and checks `typ`, `iss`, `aud`
and `exp`. Anything else is 401. Stdlib HTTP server, joserfc and httpx; nothing more.

Environment: ECHO_JWKS_URL, ECHO_ISSUER, ECHO_AUDIENCE, ECHO_PORT (default 8000).
"""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet

ALGORITHMS = ["ES256", "RS256"]
REFRESH_AFTER = 30  # seconds between two JWKS fetches triggered by unknown kids


class Unauthorized(Exception):
    pass


class Verifier:
    def __init__(self, jwks_url: str, issuer: str, audience: str) -> None:
        self.jwks_url = jwks_url
        self.claims_registry = jwt.JWTClaimsRegistry(
            iss={"essential": True, "value": issuer},
            aud={"essential": True, "value": audience},
            exp={"essential": True},
        )
        self._keys: KeySet | None = None
        self._fetched = 0.0
        self._lock = threading.Lock()

    def _key_set(self, refresh: bool = False) -> KeySet:
        with self._lock:
            if self._keys is None or (refresh and time.monotonic() - self._fetched > REFRESH_AFTER):
                response = httpx.get(self.jwks_url, timeout=5)
                response.raise_for_status()
                self._keys, self._fetched = KeySet.import_key_set(response.json()), time.monotonic()
            return self._keys

    def claims(self, authorization: str | None) -> dict:
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("no bearer token")
        try:
            try:
                decoded = jwt.decode(token, self._key_set(), algorithms=ALGORITHMS)
            except InvalidKeyIdError:  # a key rotated in since the last fetch
                decoded = jwt.decode(token, self._key_set(refresh=True), algorithms=ALGORITHMS)
            if decoded.header.get("typ") != "at+jwt":  # RFC 9068 §4: only access-token JWTs
                raise Unauthorized("not an access token")
            self.claims_registry.validate(decoded.claims)
        except (JoseError, ValueError) as exc:
            raise Unauthorized(exc.__class__.__name__) from None
        return decoded.claims


def handler(verifier: Verifier) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            if self.path == "/healthz":  # for the orchestrator's probes, which hold no token
                return self._send(200, {"status": "ok"})
            try:
                claims = verifier.claims(self.headers.get("Authorization"))
            except Unauthorized as exc:
                return self._send(
                    401,
                    {"error": "invalid_token", "error_description": str(exc)},
                    {"WWW-Authenticate": 'Bearer error="invalid_token"'},
                )
            except httpx.HTTPError:
                return self._send(503, {"error": "jwks_unavailable"})
            self._send(200, {"method": self.command, "path": self.path, "claims": claims})

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _answer

        def _send(self, status: int, body: dict, headers: dict | None = None) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass  # quiet: no line per request

    return Handler


def make_server(verifier: Verifier, host: str, port: int) -> ThreadingHTTPServer:
    return ThreadingHTTPServer((host, port), handler(verifier))


if __name__ == "__main__":
    env = os.environ
    verifier = Verifier(env["ECHO_JWKS_URL"], env["ECHO_ISSUER"], env["ECHO_AUDIENCE"])
    make_server(verifier, "0.0.0.0", int(env.get("ECHO_PORT", "8000"))).serve_forever()  # noqa: S104
