"""Wire formats more than one role reads: OIDC prompt values, device user codes (RFC 8628 §6.1), and unverified
JWT payloads.

A leaf: it imports nothing from iam, so every role can use it without loading another role's code.
"""

from __future__ import annotations

import base64
import json
from typing import Any

# OIDC Core §3.1.2.1: the prompt values this server knows (the token role checks them, the sign-in pages act on them).
PROMPTS = frozenset({"none", "login", "consent", "select_account"})

# The acr values (OIDC Core §2) iam produces, from what the sign-in proved (its amr, RFC 8176): the token role
# puts them in ID tokens, the sign-in pages act on the acr_values a client asks for.
ACR_PASSWORD = "urn:iam:acr:pwd"  # one factor: a password (or an upstream sign-in without a second factor)
ACR_MFA = "urn:iam:acr:mfa"  # two factors: a password and a TOTP code (or an upstream "mfa")
ACR_VALUES = (ACR_PASSWORD, ACR_MFA)


def acr_of(amr: list[str]) -> str:
    return ACR_MFA if "mfa" in amr or len(set(amr)) > 1 else ACR_PASSWORD


def known_acr_values(acr_values: str | None) -> str | None:
    """The acr_values this server knows, in the client's order of preference (OIDC Core §3.1.2.1); the others
    are ignored, as acr_values asks for a voluntary claim."""
    known = [value for value in dict.fromkeys((acr_values or "").split()) if value in ACR_VALUES]
    return " ".join(known) or None


# RFC 8628 §6.1: 20 consonants, 8 characters (~34 bits), no vowels (no words), no look-alikes.
USER_CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
USER_CODE_LENGTH = 8


def normalise_user_code(value: str) -> str | None:
    """A user code as typed (any case, dashes, spaces) in its canonical form, or None if it cannot be one."""
    code = "".join(ch for ch in value.upper() if ch.isalnum())
    return code if len(code) == USER_CODE_LENGTH and all(ch in USER_CODE_ALPHABET for ch in code) else None


def jwt_payload(jwt: str) -> bytes:
    """The payload of a JWT as its bytes, unverified and unparsed (see jwt_claims)."""
    payload = jwt.split(".", 2)[1]
    return base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))


def jwt_claims(jwt: str) -> dict[str, Any]:
    """The payload of a JWT, unverified: for a JWT this server signed itself (read back from its own store), or
    to learn who claims to have signed one before verifying it. Raises ValueError, IndexError or
    UnicodeDecodeError on a malformed token."""
    claims = json.loads(jwt_payload(jwt))
    if not isinstance(claims, dict):
        raise ValueError("JWT payload is not an object")
    return claims
