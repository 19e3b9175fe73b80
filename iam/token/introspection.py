"""Token introspection (RFC 7662), with the phantom JWT (`Accept: application/jwt`) and signed responses (RFC 9701).

One indexed lookup per call; the JWT was signed at issuance and is returned as stored.
"""

import time

from fastapi import APIRouter, Request, Response

from iam.errors import NO_STORE, OAuthError, invalid_client, json_response
from iam.http import read_form
from iam.token.access_tokens import jwt_claims

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
    return json_response({"active": True, **jwt_claims(row.jwt), "token_type": "Bearer"}, 200, NO_STORE)


def _signed_response(iam, audience: str, row) -> Response:
    """RFC 9701: the introspection result, signed for the calling resource server."""
    result = INACTIVE if row is None else {"active": True, **jwt_claims(row.jwt), "token_type": "Bearer"}
    claims = {"iss": iam.settings.issuer, "aud": audience, "iat": int(time.time()), "token_introspection": result}
    jwt = iam.keys.sign(claims, alg="RS256", typ="token-introspection+jwt")
    return Response(jwt, 200, NO_STORE, media_type=JWT_RESPONSE)
