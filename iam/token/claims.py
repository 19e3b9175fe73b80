"""Which user claims a scope releases (OIDC Core §5.4), and the ID token (OIDC Core §2, §3.1.3.6)."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError

from iam.formats import acr_of
from iam.keys import KeyRing
from iam.peers import UserClaims

ID_TOKEN_TYP = "JWT"  # what ID tokens carry in `typ`; access tokens are at+jwt, signed introspection responses
# token-introspection+jwt (RFC 9068 §2.1, RFC 9701 §5), with the same keys

SCOPE_CLAIMS = {
    "profile": ("name", "given_name", "family_name", "preferred_username", "updated_at"),
    "email": ("email", "email_verified"),
    "groups": ("groups",),  # not in OIDC Core; what kube-apiserver and most APIs read
}
USER_SCOPES = ("openid", "profile", "email", "groups", "offline_access")
CLAIMS_SUPPORTED = sorted({"sub", "iss", "aud", "exp", "iat", "auth_time", "nonce", "acr", "amr", "azp", "at_hash",
                           "sid", *(c for names in SCOPE_CLAIMS.values() for c in names)})


def scoped_claims(user: UserClaims, scopes: set[str]) -> dict[str, Any]:
    """The user's claims released by these scopes; empty values are left out."""
    released: dict[str, Any] = {}
    for scope, names in SCOPE_CLAIMS.items():
        if scope in scopes:
            for name in names:
                value = getattr(user, name)
                if value is not None and value != "":
                    released[name] = value
    if "email" not in released:
        released.pop("email_verified", None)
    return released


def at_hash(access_token: str) -> str:
    """OIDC Core §3.1.3.6: left half of SHA-256 of the token, base64url (for RS256/ES256)."""
    half = hashlib.sha256(access_token.encode()).digest()[:16]
    return base64.urlsafe_b64encode(half).rstrip(b"=").decode()


def how_signed_in(signed_in: dict[str, Any]) -> dict[str, Any]:
    """A grant's record of how the person signed in, from the authentication role's handoff or session:
    `amr` (RFC 8176), the upstream's `acr`, and the connector (None: iam's own password)."""
    amr = signed_in.get("amr")
    acr, connector = signed_in.get("acr"), signed_in.get("connector")
    return {"amr": " ".join(amr) if isinstance(amr, list) else "pwd", "acr": acr if isinstance(acr, str) else None,
            "connector": connector if isinstance(connector, str) else None}


def id_token_claims(*, issuer: str, client_id: str, grant: dict[str, Any], user: UserClaims, access_token: str,
                    now: int, ttl: int, include_nonce: bool) -> dict[str, Any]:
    amr = grant["amr"].split()
    claims = {
        "iss": issuer,
        "sub": user.sub,
        "aud": client_id,
        "azp": client_id,
        "exp": now + ttl,
        "iat": now,
        "auth_time": grant["auth_time"],
        "acr": grant.get("acr") or acr_of(amr),  # an upstream's acr as given, else iam's own
        "at_hash": at_hash(access_token),
    }
    if grant["amr"]:  # an upstream provider that reports no method: none claimed
        claims["amr"] = grant["amr"].split()
    if grant.get("sid"):
        claims["sid"] = grant["sid"]
    if include_nonce and grant.get("nonce"):
        claims["nonce"] = grant["nonce"]
    claims.update(scoped_claims(user, set(grant["scope"].split())))
    return claims


def id_token_hint_claims(keys: KeyRing, issuer: str, hint: str) -> dict[str, Any]:
    """The claims of an ID token this issuer signed (OIDC Core §3.1.2.1: expired ones are fine), else ValueError.
    Nothing else the same keys sign passes: not an access token's JWT, not a signed introspection response."""
    try:
        decoded = jwt.decode(hint, keys.public_set, algorithms=["RS256"])
    except (JoseError, ValueError, TypeError):
        raise ValueError("not signed by this server") from None
    claims = decoded.claims
    if (decoded.header.get("typ") != ID_TOKEN_TYP or claims.get("iss") != issuer
            or not isinstance(claims.get("sub"), str) or not isinstance(claims.get("aud"), str)
            or claims.get("azp") != claims["aud"]):
        raise ValueError("not an ID token of this issuer")
    return claims
