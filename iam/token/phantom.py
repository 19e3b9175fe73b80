"""Forward-auth for stock ingress controllers (contract: `GET /oauth/v2/phantom`).

`Authorization: Bearer <opaque>` in, `200` with `Authorization: Bearer <jwt>` out, or `401` with
`WWW-Authenticate` (RFC 6750 §3). nginx `auth_request` / ingress-nginx `auth-url`, Traefik ForwardAuth and
Envoy ext_authz (which appends the original path) all call it as they are, with any method.
Serve it inside the cluster only: it hands the JWT to whoever holds the opaque token.
"""

from fastapi import Request, Response

from iam.errors import invalid_token
from iam.http import PlainRoute, bearer_token
from iam.observability import INTROSPECTIONS

ACTIVE = INTROSPECTIONS.labels("phantom", "active")
INACTIVE = INTROSPECTIONS.labels("phantom", "inactive")
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


async def phantom(request: Request) -> Response:
    token = bearer_token(request)
    if token is None:
        INACTIVE.inc()
        return invalid_token().response()
    live = await request.app.state.iam.access_tokens.live(token)
    (INACTIVE if live is None else ACTIVE).inc()
    if live is None:
        return invalid_token("the access token is invalid, expired or revoked").response()
    return Response(status_code=200, headers={"Authorization": f"Bearer {live.jwt}", "Cache-Control": "no-store"})


# Plain routes, mounted on the app itself (iam/app.py): the hot path skips FastAPI's per-request machinery.
routes = [PlainRoute(path, phantom, methods=_METHODS, include_in_schema=False)
          for path in ("/oauth/v2/phantom", "/oauth/v2/phantom/{_path:path}")]
