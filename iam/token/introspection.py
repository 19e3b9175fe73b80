"""Token introspection (RFC 7662), with the phantom JWT (`Accept: application/jwt`) and signed responses (RFC 9701).

At most one indexed lookup per call, none while the token is in the hot cache (iam/token/hot_cache.py); the
JWT was signed at issuance and is returned as stored.
"""

import time

from fastapi import Request, Response

from iam.config import ClientConfig
from iam.errors import NO_STORE, OAuthError, invalid_client, json_response
from iam.http import TOKEN_PARAMETER, PlainRoute, read_form
from iam.observability import INTROSPECTIONS, audit, source_of
from iam.token.access_tokens import introspection_members
from iam.token.clients import authenticate
from iam.token.services import TokenServices, token_services
from iam.token.store import AccessTokenRow

INACTIVE = {"active": False}
INTROSPECT_ACTIVE = INTROSPECTIONS.labels("introspect", "active")
INTROSPECT_INACTIVE = INTROSPECTIONS.labels("introspect", "inactive")
JWT_RESPONSE = "application/token-introspection+jwt"


async def introspect(request: Request) -> Response:
    services = token_services(request)
    form = await read_form(request, TOKEN_PARAMETER)
    caller = await authenticate(request, services.clients, form)
    if caller.is_public:
        # RFC 7662 §2.1 / §4: the endpoint requires authorization, against token scanning.
        raise invalid_client("introspection requires a confidential client")
    right = caller.introspection
    if right is False:
        audit("introspection.refused", "failure", client_id=caller.client_id, source=source_of(request))
        raise OAuthError("unauthorized_client", "this client may not introspect tokens", 403)
    token = form.get("token")
    if token is None:
        raise OAuthError("invalid_request", "token is required")
    live = await services.access_tokens.live(token)
    if live is not None and right is not True and right.audiences.isdisjoint(live.audiences):
        live = None  # §2.2: not meant for this resource server, so it learns nothing of it
    (INTROSPECT_INACTIVE if live is None else INTROSPECT_ACTIVE).inc()
    accept = request.headers.get("accept", "")
    if JWT_RESPONSE in accept:
        return _signed_response(services, caller, None if live is None else live.row)
    if live is None:
        return json_response(INACTIVE, 200, NO_STORE)
    if "application/jwt" in accept:
        return Response(live.jwt, 200, NO_STORE, media_type="application/jwt")
    return Response(live.introspection_json, 200, NO_STORE, media_type="application/json")


# A plain route, mounted on the app itself (iam/app.py): the hot path skips FastAPI's per-request machinery.
routes = [PlainRoute("/oauth/v2/introspect", introspect, methods=["POST"], include_in_schema=False)]


def _signed_response(services: TokenServices, caller: ClientConfig, row: AccessTokenRow | None) -> Response:
    """RFC 9701: the introspection result, signed for the calling resource server with the algorithm it
    registered (§6, `introspection_signed_response_alg`)."""
    result = INACTIVE if row is None else introspection_members(row.jwt)
    claims = {"iss": services.settings.issuer, "aud": caller.client_id, "iat": int(time.time()),
              "token_introspection": result}
    jwt = services.keys.sign(claims, alg=caller.introspection_signed_response_alg, typ="token-introspection+jwt")
    return Response(jwt, 200, NO_STORE, media_type=JWT_RESPONSE)
