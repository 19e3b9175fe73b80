"""Authorization server metadata (RFC 8414, OpenID Connect Discovery 1.0) and the JWKS.

Both documents are built once at start-up (iam/token/metadata.py, iam/keys.py) and served as they are.
"""

from fastapi import APIRouter, Request, Response

from iam.token.services import token_services

router = APIRouter()

CACHEABLE = {"Cache-Control": "public, max-age=300"}


@router.get("/.well-known/oauth-authorization-server")
@router.get("/.well-known/openid-configuration")
async def discovery(request: Request) -> Response:
    return Response(token_services(request).metadata_json, headers=CACHEABLE, media_type="application/json")


@router.get("/oauth/v2/jwks")
async def jwks(request: Request) -> Response:
    return Response(token_services(request).keys.jwks_json, headers=CACHEABLE, media_type="application/jwk-set+json")
