"""Token revocation (RFC 7009)."""

from fastapi import APIRouter, Request, Response

from iam.errors import NO_STORE, OAuthError
from iam.http import TOKEN_PARAMETER, read_form
from iam.internal import require_peer
from iam.observability import audit, source_of
from iam.roles import Role
from iam.token.clients import authenticate

router = APIRouter()


@router.post("/internal/v1/subjects/{sub}/revoke")
async def revoke_subject(sub: str, request: Request) -> Response:
    """A disabled or deleted user (told by the user-management role): every grant and token of theirs ends."""
    await require_peer(request, Role.TOKEN, Role.USER_MANAGEMENT)
    await request.app.state.iam.token_store.revoke_subject(sub)
    return Response(status_code=204)


@router.post("/oauth/v2/revoke")
async def revoke(request: Request) -> Response:
    iam = request.app.state.iam
    form = await read_form(request, TOKEN_PARAMETER)
    client = await authenticate(request, form)
    token = form.get("token")
    if token is None:
        raise OAuthError("invalid_request", "token is required")
    # RFC 7009 §2.1: token_type_hint is only a hint; §2.2: unknown or foreign tokens still answer 200.
    if await iam.access_tokens.revoke(token, client):
        audit("token.revoked", client_id=client.client_id, source=source_of(request))
    return Response(status_code=200, headers=NO_STORE)
