"""Forward-auth for stock ingress controllers (contract: `GET /oauth/v2/phantom`).

`Authorization: Bearer <opaque>` in, `200` with `Authorization: Bearer <jwt>` out, or `401` with
`WWW-Authenticate` (RFC 6750 §3). nginx `auth_request` / ingress-nginx `auth-url`, Traefik ForwardAuth and
Envoy ext_authz (which appends the original path) all call it as they are, with any method.
Serve it inside the cluster only: it hands the JWT to whoever holds the opaque token.
"""

from fastapi import APIRouter, Request, Response

from iam.errors import invalid_token
from iam.http import bearer_token

router = APIRouter()

_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


@router.api_route("/oauth/v2/phantom", methods=_METHODS)
@router.api_route("/oauth/v2/phantom/{_path:path}", methods=_METHODS, include_in_schema=False)
async def phantom(request: Request) -> Response:
    token = bearer_token(request)
    if token is None:
        return invalid_token().response()
    row = await request.app.state.iam.access_tokens.active(token)
    if row is None:
        return invalid_token("the access token is invalid, expired or revoked").response()
    return Response(status_code=200, headers={"Authorization": f"Bearer {row.jwt}", "Cache-Control": "no-store"})
