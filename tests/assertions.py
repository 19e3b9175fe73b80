"""Client assertions as clients build them (RFC 7523 §2.2, OpenID Connect Core §9), shared by the tests and
bench/: keys, the signed JWT, the form."""

from __future__ import annotations

import base64
import json
import time
import uuid
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, OKPKey, RSAKey

ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
ALGS = ("RS256", "PS256", "ES256", "EdDSA")


def client_keys() -> dict[str, RSAKey | ECKey | OKPKey]:
    """One private key per algorithm; PS256 and RS256 share the RSA key, as RFC 7518 allows."""
    rsa = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}, private=True)
    return {"RS256": rsa, "PS256": rsa, "ES256": ECKey.generate_key("P-256", parameters={"kid": "ec-1"}, private=True),
            "EdDSA": OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"}, private=True)}


def public_jwks(keys: dict[str, RSAKey | ECKey | OKPKey]) -> dict[str, Any]:
    unique = {key.kid: key for key in keys.values()}
    return {"keys": [key.as_dict(private=False) for key in unique.values()]}


def assertion(key: RSAKey | ECKey | OKPKey, client_id: str, audience: str | list[str], *, alg: str = "RS256",
              lifetime: int = 60, now: float | None = None, kid: str | None = None, **overrides: Any) -> str:
    issued = int(time.time() if now is None else now)
    claims = {"iss": client_id, "sub": client_id, "aud": audience, "iat": issued, "exp": issued + lifetime,
              "jti": uuid.uuid4().hex, **overrides}
    claims = {name: value for name, value in claims.items() if value is not None}
    return jwt.encode({"alg": alg, "kid": kid or key.kid}, claims, key, algorithms=[alg])


def unsigned(claims: dict[str, Any]) -> str:
    """alg none (RFC 7519 §6): what a server must never accept."""
    def part(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
    return f"{part({'alg': 'none'})}.{part(claims)}."


def form(signed: str, client_id: str | None = None, **params: str) -> dict[str, str]:
    data = {"client_assertion_type": ASSERTION_TYPE, "client_assertion": signed, **params}
    if client_id is not None:
        data["client_id"] = client_id
    return data
