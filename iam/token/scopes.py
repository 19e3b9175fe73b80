"""Scope rules shared by every grant (RFC 6749 §3.3)."""

from iam.config import SCOPE_TOKEN
from iam.errors import OAuthError


def granted_scope(requested: str | None, allowed: frozenset[str]) -> str:
    """The scope to grant: the request's (which must be within what the client may have), or all of it."""
    if requested is None:
        return " ".join(sorted(allowed))
    tokens = requested.split(" ")
    if any(not SCOPE_TOKEN.match(token) for token in tokens):
        raise OAuthError("invalid_scope", "malformed scope")
    unknown = set(tokens) - allowed
    if unknown:
        raise OAuthError("invalid_scope", "the client may not request: " + " ".join(sorted(unknown)))
    return " ".join(dict.fromkeys(tokens))
