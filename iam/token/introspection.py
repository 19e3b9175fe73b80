"""Token introspection (RFC 7662), with the phantom JWT (`Accept: application/jwt`) and signed responses (RFC 9701).

One indexed lookup per call; the JWT was signed at issuance and is returned as stored.
"""

import time

from fastapi import APIRouter, Request, Response

from iam.errors import NO_STORE, OAuthError, invalid_client, json_response
from iam.http import read_form
from iam.internal import require_peer
from iam.roles import Role
from iam.token.access_tokens import introspection_members

router = APIRouter()

INACTIVE = {"active": False}
JWT_RESPONSE = "application/token-introspection+jwt"


@router.post("/oauth/v2/introspect")
async def introspect(request: Request) -> Response:
    iam = request.app.state.iam
    form = await read_form(request)
    caller = await iam.clients.authenticate(request.headers.get("authorization"), form)
    if caller.is_public:
        # RFC 7662 §2.1 / §4: the endpoint requires authorization, against token scanning.
        raise invalid_client("introspection requires a confidential client")
    token = form.get("token")
    if token is None:
        raise OAuthError("invalid_request", "token is required")
    row = await iam.access_tokens.active(token)
    accept = request.headers.get("accept", "")
    if JWT_RESPONSE in accept:
        return _signed_response(iam, caller.client_id, row)
    if row is None:
        return json_response(INACTIVE, 200, NO_STORE)
    if "application/jwt" in accept:
        return Response(row.jwt, 200, NO_STORE, media_type="application/jwt")
    return json_response(introspection_members(row.jwt), 200, NO_STORE)


@router.post("/internal/v1/introspect")
async def introspect_for_peer(request: Request) -> Response:
    """The same answer for the other roles, which prove their role instead of holding a client secret."""
    await require_peer(request, Role.TOKEN, Role.USER_MANAGEMENT, Role.AUTHENTICATION)
    try:
        token = (await request.json())["token"]
        if not isinstance(token, str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise OAuthError("invalid_request", "body must be {\"token\": string}") from None
    members = await request.app.state.iam.access_tokens.introspect(token)
    return json_response(members or INACTIVE, 200, NO_STORE)


def _signed_response(iam, audience: str, row) -> Response:
    """RFC 9701: the introspection result, signed for the calling resource server."""
    result = INACTIVE if row is None else introspection_members(row.jwt)
    claims = {"iss": iam.settings.issuer, "aud": audience, "iat": int(time.time()), "token_introspection": result}
    jwt = iam.keys.sign(claims, alg="RS256", typ="token-introspection+jwt")
    return Response(jwt, 200, NO_STORE, media_type=JWT_RESPONSE)
