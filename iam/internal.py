"""The roles' internal API (`/internal/v1/...`): never routed by the ingress, callers prove their role.

Every role serves its public keys here, so the others can verify what it signs.
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from iam.errors import PeerRejected, invalid_token
from iam.formats import jwt_claims
from iam.http import bearer_token
from iam.peers import SERVICE_TYP, role_id
from iam.roles import Role
from iam.runtime import shared

router = APIRouter()


@router.get("/internal/v1/jwks")
async def jwks(request: Request) -> Response:
    return Response(shared(request).keys.jwks_json, media_type="application/jwk-set+json")


async def require_peer(request: Request, owner: Role, *callers: Role) -> Role:
    """The role that signed this request's service assertion for `owner`, if it is one of `callers`; else 401."""
    token = bearer_token(request)
    if token is None:
        raise invalid_token()
    try:
        issuer = jwt_claims(token).get("iss", "")
    except (ValueError, IndexError, UnicodeDecodeError, AttributeError):
        raise invalid_token("malformed service assertion") from None
    caller = next((role for role in callers if role_id(role) == issuer), None)
    if caller is None:
        raise invalid_token("this caller may not use this API")
    try:
        await shared(request).peer_keys.verify(token, issuer=caller, audience=role_id(owner), typ=SERVICE_TYP)
    except PeerRejected as exc:
        raise invalid_token(str(exc)) from None
    return caller
