"""Token revocation (RFC 7009)."""

from fastapi import APIRouter, Request, Response

from iam.errors import NO_STORE, OAuthError
from iam.observability import audit, source_of
from iam.http import read_form
from iam.token.clients import authenticate

router = APIRouter()


@router.post("/oauth/v2/revoke")
async def revoke(request: Request) -> Response:
    iam = request.app.state.iam
    form = await read_form(request)
    client = await authenticate(request, form)
    token = form.get("token")
    if token is None:
        raise OAuthError("invalid_request", "token is required")
    # RFC 7009 §2.1: token_type_hint is only a hint; §2.2: unknown or foreign tokens still answer 200.
    if await iam.access_tokens.revoke(token, client):
        audit("token.revoked", client_id=client.client_id, source=source_of(request))
    return Response(status_code=200, headers=NO_STORE)
