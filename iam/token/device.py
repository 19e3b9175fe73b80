"""The device authorization grant (RFC 8628): the device's endpoint, and the approval the authentication
role reports back over the internal API when a person has entered the user code and said yes or no."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response

from iam.errors import NO_STORE, OAuthError, json_response
from iam.formats import USER_CODE_ALPHABET, USER_CODE_LENGTH, normalise_user_code
from iam.http import read_form
from iam.internal import require_peer
from iam.roles import Role
from iam.token.access_tokens import digest, new_token
from iam.token.clients import authenticate
from iam.token.scopes import granted_scope

router = APIRouter()

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEVICE_CODE_TTL = 600
POLL_INTERVAL = 5
def user_code_digest(code: str) -> bytes:
    return hashlib.sha256(code.encode()).digest()


@router.post("/oauth/v2/device_authorization")
async def device_authorization(request: Request) -> Response:
    iam = request.app.state.iam
    form = await read_form(request)
    client = await authenticate(request, form)
    if DEVICE_GRANT not in client.grant_types:
        raise OAuthError("unauthorized_client", "the client may not use the device authorization grant")
    scope = granted_scope(form.get("scope"), client.scopes)
    device_code = new_token()
    code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(USER_CODE_LENGTH))
    now = int(time.time())
    await iam.token_store.add_device_code({
        "digest": digest(device_code), "user_code": user_code_digest(code), "client_id": client.client_id,
        "scope": scope, "interval": POLL_INTERVAL, "last_poll": 0, "status": "pending",
        "expires_at": now + DEVICE_CODE_TTL,
    })
    user_code = f"{code[:4]}-{code[4:]}"
    verification = f"{iam.settings.login_base}/authn/device"
    return json_response({
        "device_code": device_code,
        "user_code": user_code,
        "verification_uri": verification,
        "verification_uri_complete": f"{verification}?{urlencode({'user_code': user_code})}",
        "expires_in": DEVICE_CODE_TTL,
        "interval": POLL_INTERVAL,
    }, 200, NO_STORE)


class DeviceApprovals:
    """What the authentication role may do with a user code: look it up, then approve or deny it once."""

    def __init__(self, iam) -> None:
        self.iam = iam

    async def device_lookup(self, user_code: str) -> dict | None:
        code = normalise_user_code(user_code)
        found = code and await self.iam.token_store.find_device_code(user_code=user_code_digest(code))
        if not found or found["status"] != "pending" or found["expires_at"] < time.time():
            return None
        return {"client_id": found["client_id"], "scope": found["scope"]}

    async def device_decide(self, user_code: str, approve: bool, session: dict) -> bool:
        code = normalise_user_code(user_code)
        found = code and await self.iam.token_store.find_device_code(user_code=user_code_digest(code))
        if not found:
            return False
        client = self.iam.clients.get(found["client_id"])
        now = int(time.time())
        grant = None
        if approve and client is not None:
            offline = "offline_access" in found["scope"].split()
            grant = {
                "id": uuid.uuid4().hex, "client_id": client.client_id, "subject": session["sub"],
                "scope": found["scope"], "sid": session.get("sid"), "auth_time": session["auth_time"],
                "amr": " ".join(session.get("amr") or ["pwd"]), "acr": None, "nonce": None, "offline": offline,
                "created_at": now, "expires_at": now + (client.offline_grant_ttl if offline else client.grant_ttl),
                "revoked": False,
            }
        return await self.iam.token_store.decide_device_code(user_code_digest(code), now, grant)


@router.get("/internal/v1/device/{user_code}")
async def lookup_for_peer(user_code: str, request: Request) -> Response:
    await require_peer(request, Role.TOKEN, Role.AUTHENTICATION)
    found = await request.app.state.iam.device_approvals.device_lookup(user_code)
    return json_response(found or {"error": "not_found"}, 200 if found else 404)


@router.post("/internal/v1/device/{user_code}")
async def decide_for_peer(user_code: str, request: Request) -> Response:
    await require_peer(request, Role.TOKEN, Role.AUTHENTICATION)
    try:
        body = await request.json()
        approve, session = bool(body["approve"]), body["session"]
        if not isinstance(session, dict) or not isinstance(session.get("sub"), str):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise OAuthError("invalid_request", "body must be {approve, session}") from None
    decided = await request.app.state.iam.device_approvals.device_decide(user_code, approve, session)
    return json_response({"decided": decided}, 200 if decided else 409)
