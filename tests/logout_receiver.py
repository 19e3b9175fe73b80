"""A relying party's back-channel logout endpoint (OpenID Connect Back-Channel Logout 1.0 §2.5), for tests.

A real HTTP server on a free loopback port, one path per client (`/<client_id>`), that records what it is sent
and answers as a test tells it to (a status, or not at all for a while). `validate()` checks a logout token as an RP library
does (§2.6): signature against the issuer's JWKS, typ, iss, aud, iat/exp, the event, sub or sid, no nonce,
and a jti not seen before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote

from joserfc import jwt
from joserfc.jwk import KeySet

EVENT = "http://schemas.openid.net/event/backchannel-logout"


@dataclass
class Received:
    client_id: str
    content_type: str
    form: dict[str, list[str]]

    @property
    def token(self) -> str:
        assert self.form.keys() == {"logout_token"} and len(self.form["logout_token"]) == 1, self.form
        return self.form["logout_token"][0]


@dataclass
class Receiver:
    port: int = 0
    received: list[Received] = field(default_factory=list)
    status: dict[str, int] = field(default_factory=dict)  # per client id; 200 when unset
    held: set[str] = field(default_factory=set)  # clients whose requests get no answer until release()
    _release: threading.Event = field(default_factory=threading.Event)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def uri(self, client_id: str) -> str:
        return f"http://127.0.0.1:{self.port}/{client_id}"

    def for_client(self, client_id: str) -> list[Received]:
        with self._changed:
            return [r for r in self.received if r.client_id == client_id]

    def wait_for(self, client_id: str, count: int = 1, timeout: float = 20) -> list[Received]:
        """The first `count` requests to the client's endpoint, once they came (deliveries run off the request
        path); fails if they do not come at all."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while len(got := [r for r in self.received if r.client_id == client_id]) < count:
                left = deadline - time.monotonic()
                assert left > 0, f"{client_id}: {len(got)} logout request(s), expected {count}"
                self._changed.wait(left)
            return got

    def release(self) -> None:
        self._release.set()

    def reset(self) -> None:
        self.release()
        with self._changed:
            self.received.clear()
        self.status.clear()
        self.held.clear()
        self._release = threading.Event()

    def _record(self, entry: Received) -> None:
        with self._changed:
            self.received.append(entry)
            self._changed.notify_all()


@contextmanager
def running() -> Iterator[Receiver]:
    receiver = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            client_id = unquote(self.path.lstrip("/"))
            body = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
            receiver._record(Received(client_id, self.headers.get("Content-Type", ""), parse_qs(body)))
            if client_id in receiver.held:  # a receiver that hangs: iam's attempt times out
                receiver._release.wait(30)
            status = receiver.status.get(client_id, 200)
            self.send_response(status)
            self.send_header("Cache-Control", "no-store")  # §2.8
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    receiver.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()


def validate(token: str, jwks: dict, issuer: str, client_id: str, seen_jtis: set[str]) -> dict[str, Any]:
    """§2.6, steps 1-8 as an RP performs them; returns the claims, raises AssertionError on a bad token."""
    decoded = jwt.decode(token, KeySet.import_key_set(jwks), algorithms=["RS256", "ES256"])  # signature
    assert decoded.header["typ"] == "logout+jwt", decoded.header  # §2.4: explicitly typed
    claims = decoded.claims
    now = time.time()
    assert claims["iss"] == issuer
    assert claims["aud"] == client_id or (isinstance(claims["aud"], list) and client_id in claims["aud"])
    assert isinstance(claims["iat"], int) and claims["iat"] <= now + 5
    assert isinstance(claims["exp"], int) and now < claims["exp"] <= claims["iat"] + 300
    assert claims["events"] == {EVENT: {}}
    assert "sub" in claims or "sid" in claims
    assert "nonce" not in claims  # §2.6 step 5: a nonce means it could be an ID token
    assert isinstance(claims["jti"], str) and claims["jti"] not in seen_jtis  # not replayed
    seen_jtis.add(claims["jti"])
    return claims
