"""The token endpoint (RFC 6749 §3.2): authenticate the client, then hand over to the grant's module."""

from fastapi import APIRouter, Request, Response

from iam.errors import NO_STORE, OAuthError, json_response
from iam.http import read_form
from iam.token.device import DEVICE_GRANT
from iam.token.grants import authorization_code, client_credentials, device_code, refresh_token

router = APIRouter()

GRANTS = {
    "authorization_code": authorization_code.grant,
    "client_credentials": client_credentials.grant,
    "refresh_token": refresh_token.grant,
    DEVICE_GRANT: device_code.grant,
}


@router.post("/oauth/v2/token")
async def token(request: Request) -> Response:
    iam = request.app.state.iam
    form = await read_form(request)
    client = await iam.clients.authenticate(request.headers.get("authorization"), form)
    grant_type = form.get("grant_type")
    if grant_type is None:
        raise OAuthError("invalid_request", "grant_type is required")
    handler = GRANTS.get(grant_type)
    if handler is None:
        raise OAuthError("unsupported_grant_type", "this server does not support that grant_type")
    if grant_type not in client.grant_types:
        raise OAuthError("unauthorized_client", "the client may not use this grant_type")
    return json_response(await handler(iam, client, form), 200, NO_STORE)
