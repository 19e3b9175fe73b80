"""A DPoP client (RFC 9449) made with joserfc: it holds a key and signs a proof for each request."""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from typing import Any

from joserfc import jws
from joserfc.jwk import ECKey, OKPKey, RSAKey

KEY_MAKERS = {
    "ES256": lambda: ECKey.generate_key("P-256"),
    "RS256": lambda: RSAKey.generate_key(2048),
    "PS256": lambda: RSAKey.generate_key(2048),
    "EdDSA": lambda: OKPKey.generate_key("Ed25519"),
    "Ed25519": lambda: OKPKey.generate_key("Ed25519"),
}


def ath(token: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=").decode()


class DPoPClient:
    def __init__(self, alg: str = "ES256") -> None:
        self.alg = alg
        self.key = KEY_MAKERS[alg]()
        self.jkt = self.key.thumbprint()

    def proof(self, method: str, url: str, *, access_token: str | None = None, nonce: str | None = None,
              header: dict[str, Any] | None = None, **claims: Any) -> str:
        """A proof for one request; `header` and `claims` override what a correct client sends."""
        body: dict[str, Any] = {"jti": uuid.uuid4().hex, "htm": method, "htu": url, "iat": int(time.time())}
        if access_token is not None:
            body["ath"] = ath(access_token)
        if nonce is not None:
            body["nonce"] = nonce
        body.update(claims)
        protected = {"typ": "dpop+jwt", "alg": self.alg, "jwk": self.key.as_dict(private=False), **(header or {})}
        return jws.serialize_compact(protected, json.dumps(body).encode(), self.key, algorithms=[self.alg])


def unsigned_proof(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A proof with any header (alg none, a forged one): signed with nothing."""
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
    return f"{part(header)}.{part(claims)}."
