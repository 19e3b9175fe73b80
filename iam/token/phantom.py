"""Forward-auth for stock ingress controllers (contract: `GET /oauth/v2/phantom`).

`Authorization: Bearer <opaque>` in, `200` with `Authorization: Bearer <jwt>` out, or `401` with
`WWW-Authenticate` (RFC 6750 §3). nginx `auth_request` / ingress-nginx `auth-url`, Traefik ForwardAuth and
Envoy ext_authz (which appends the original path) all call it as they are, with any method.
Serve it inside the cluster only: it hands the JWT to whoever holds the opaque token.

`GET /oauth/v2/phantom?audience=<aud>` also requires the token to be meant for that API (its JWT's `aud`
contains it; ASVS 5 V10.3.1): the ingress names each route's audience in its fixed auth URL. The parameter is
read on this exact path only; under `/oauth/v2/phantom/...` (Envoy appends the caller's path and query) it
would be the caller's to choose.
"""

from urllib.parse import parse_qs

from fastapi import Request, Response

from iam.errors import invalid_token
from iam.http import PlainRoute, bearer_token
from iam.observability import INTROSPECTIONS
from iam.token.services import token_services

ACTIVE = INTROSPECTIONS.labels("phantom", "active")
INACTIVE = INTROSPECTIONS.labels("phantom", "inactive")
WRONG_AUDIENCE = INTROSPECTIONS.labels("phantom", "wrong_audience")
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


async def phantom(request: Request) -> Response:
    token = bearer_token(request)
    live = None if token is None else await token_services(request).access_tokens.live(token)
    if live is None:
        INACTIVE.inc()
        if token is None:
            return invalid_token().response()
        return invalid_token("the access token is invalid, expired or revoked").response()
    query = request.scope["query_string"]
    if query and request.scope["path"] == "/oauth/v2/phantom":
        wanted = parse_qs(query.decode("latin-1")).get("audience")
        if wanted and not live.audiences.issuperset(wanted):
            WRONG_AUDIENCE.inc()
            return invalid_token("the access token is not meant for this API").response()
    ACTIVE.inc()
    return Response(status_code=200, headers={"Authorization": f"Bearer {live.jwt}", "Cache-Control": "no-store"})


# Plain routes, mounted on the app itself (iam/app.py): the hot path skips FastAPI's per-request machinery.
routes = [PlainRoute(path, phantom, methods=_METHODS, include_in_schema=False)
          for path in ("/oauth/v2/phantom", "/oauth/v2/phantom/{_path:path}")]
