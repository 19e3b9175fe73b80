"""Protecting an API with the token role's access tokens (RFC 6750): the SCIM API and userinfo use it."""

from __future__ import annotations

from fastapi import Request

from iam.errors import insufficient_scope, invalid_token
from iam.http import bearer_token
from iam.peers import Tokens


async def require_token(request: Request, tokens: Tokens, scope: str | None = None) -> dict:
    """The introspection members of the request's bearer token, as the token role (`tokens`) tells them; 401
    without a live one, 403 without `scope`."""
    token = bearer_token(request)
    if token is None:
        raise invalid_token()
    members = await tokens.introspect(token)
    if members is None:
        raise invalid_token("the access token is invalid, expired or revoked")
    if scope is not None and scope not in members.get("scope", "").split():
        raise insufficient_scope(scope, f"this call needs the {scope} scope")
    return members
