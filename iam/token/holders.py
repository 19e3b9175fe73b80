"""Who may use a token: the holder of a DPoP key (RFC 9449 `cnf.jkt`) or of a TLS client certificate (RFC 8705
`cnf.x5t#S256`). One holder flows from the token endpoint through every grant into the token's `cnf` claim
(RFC 7800) and, for a public client's refresh tokens, into its grant row; protected resources check it back
(iam/token/senders.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

Confirmation = Literal["jkt", "x5t#S256"]
CONFIRMATIONS: tuple[Confirmation, ...] = ("jkt", "x5t#S256")


@dataclass(frozen=True, slots=True)
class Holder:
    member: Confirmation  # the `cnf` member: a JWK thumbprint (RFC 7638) or a certificate's SHA-256 (RFC 8705 §3.1)
    thumbprint: str  # base64url

    @property
    def cnf(self) -> dict[str, str]:
        return {self.member: self.thumbprint}

    @property
    def is_dpop(self) -> bool:
        return self.member == "jkt"


def dpop_key(jkt: str) -> Holder:
    return Holder("jkt", jkt)


def certificate(x5t: str) -> Holder:
    return Holder("x5t#S256", x5t)


def token_type(holder: Holder | None) -> str:
    """`token_type` of a token response and of introspection: DPoP for a DPoP-bound token (RFC 9449 §5, §6.2);
    a certificate-bound token is still a Bearer token (RFC 8705 §3)."""
    return "DPoP" if holder is not None and holder.is_dpop else "Bearer"


def holder_of(claims: dict[str, Any]) -> Holder | None:
    """The holder a token's claims bind it to (its `cnf`), or None for a bearer token."""
    cnf = claims.get("cnf")
    if not isinstance(cnf, dict):
        return None
    for member in CONFIRMATIONS:
        value = cnf.get(member)
        if isinstance(value, str):
            return Holder(member, value)
    return None
