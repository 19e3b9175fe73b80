"""PKCE (RFC 7636) with S256 only, in one place: the challenge the authorization request brings, and the
verifier the token request proves it with."""

from __future__ import annotations

import re

from authlib.oauth2.rfc7636 import create_s256_code_challenge

from iam.security import constant_time_equal

METHOD = "S256"
CHALLENGE = re.compile(r"^[A-Za-z0-9_-]{43}$")  # RFC 7636 §4.2: BASE64URL(SHA256(verifier))
VERIFIER = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")  # RFC 7636 §4.1


def challenge_ok(challenge: str | None) -> bool:
    """Whether a code_challenge has the shape of an S256 challenge."""
    return challenge is not None and CHALLENGE.match(challenge) is not None


def verifier_matches(verifier: str | None, challenge: str) -> bool:
    """Whether a code_verifier is well formed and hashes to the stored challenge (RFC 7636 §4.6)."""
    if verifier is None or not VERIFIER.match(verifier):
        return False
    return constant_time_equal(str(create_s256_code_challenge(verifier)), challenge)
