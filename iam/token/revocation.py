"""Token revocation (RFC 7009)."""

from fastapi import APIRouter, Request, Response

from iam.errors import NO_STORE, OAuthError
from iam.http import TOKEN_PARAMETER, read_form
from iam.observability import audit, source_of
from iam.token.clients import authenticate
from iam.token.services import token_services

router = APIRouter()


@router.post("/oauth/v2/revoke")
async def revoke(request: Request) -> Response:
    services = token_services(request)
    form = await read_form(request, TOKEN_PARAMETER)
    client = await authenticate(request, services.clients, form)
    token = form.get("token")
    if token is None:
        raise OAuthError("invalid_request", "token is required")
    # RFC 7009 §2.1: token_type_hint is only a hint; §2.2: unknown or foreign tokens still answer 200.
    if await services.access_tokens.revoke(token, client):
        audit("token.revoked", client_id=client.client_id, source=source_of(request))
    return Response(status_code=200, headers=NO_STORE)
