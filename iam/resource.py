"""Protecting an API with the token role's access tokens (RFC 6750): the SCIM API and userinfo use it."""

from __future__ import annotations

from fastapi import Request

from iam.errors import OAuthError, invalid_token
from iam.http import bearer_token


async def require_token(request: Request, scope: str | None = None) -> dict:
    """The introspection members of the request's bearer token; 401 without a live one, 403 without `scope`."""
    token = bearer_token(request)
    if token is None:
        raise invalid_token()
    members = await request.app.state.iam.tokens.introspect(token)
    if members is None:
        raise invalid_token("the access token is invalid, expired or revoked")
    if scope is not None and scope not in members.get("scope", "").split():
        challenge = f'Bearer realm="iam", error="insufficient_scope", scope="{scope}"'
        raise OAuthError("insufficient_scope", f"this call needs the {scope} scope", 403,
                         {"WWW-Authenticate": challenge})
    return members
