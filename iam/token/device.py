"""The device authorization endpoint (RFC 8628 §3.1, §3.2): a device code for the device, a user code for the person
(iam/token/device_codes.py holds their rules and the approval the authentication role reports back)."""

from __future__ import annotations

import secrets
import time
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response

from iam.errors import NO_STORE, OAuthError, json_response
from iam.formats import USER_CODE_ALPHABET, USER_CODE_LENGTH
from iam.http import read_form
from iam.token.access_tokens import digest, new_token
from iam.token.clients import authenticate
from iam.token.device_codes import DEVICE_CODE_TTL, DEVICE_GRANT, POLL_INTERVAL, user_code_digest
from iam.token.scopes import granted_scope
from iam.token.services import token_services

router = APIRouter()

@router.post("/oauth/v2/device_authorization")
async def device_authorization(request: Request) -> Response:
    services = token_services(request)
    form = await read_form(request)
    client = await authenticate(request, services.clients, form)
    if DEVICE_GRANT not in client.grant_types:
        raise OAuthError("unauthorized_client", "the client may not use the device authorization grant")
    scope = granted_scope(form.get("scope"), client.scopes)
    device_code = new_token()
    code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
    now = int(time.time())
    await services.store.add_device_code({
        "digest": digest(device_code), "user_code": user_code_digest(code), "client_id": client.client_id,
        "scope": scope, "interval": POLL_INTERVAL, "last_poll": 0, "status": "pending",
        "expires_at": now + DEVICE_CODE_TTL,
    })
    user_code = f"{code[:4]}-{code[4:]}"
    verification = f"{services.settings.login_base}/authn/device"
    return json_response({
        "device_code": device_code,
        "user_code": user_code,
        "verification_uri": verification,
        "verification_uri_complete": f"{verification}?{urlencode({'user_code': user_code})}",
        "expires_in": DEVICE_CODE_TTL,
        "interval": POLL_INTERVAL,
    }, 200, NO_STORE)
