"""The device code grant (RFC 8628 §3.4, §3.5): the device polls until the person has decided."""

import time
from typing import Any

from iam.config import ClientConfig
from iam.errors import OAuthError
from iam.token.access_tokens import TOKEN_SHAPE, digest
from iam.token.holders import Holder
from iam.token.services import TokenServices
from iam.token.user_tokens import binding, current_user, mint


async def grant(services: TokenServices, client: ClientConfig, form: dict[str, str],
                holder: Holder | None) -> tuple[dict[str, Any], str]:
    device_code = form.get("device_code")
    if device_code is None:
        raise OAuthError("invalid_request", "device_code is required")
    code_digest = digest(device_code) if TOKEN_SHAPE.match(device_code) else None
    found = code_digest and await services.store.find_device_code(digest=code_digest)
    if not found or code_digest is None or found["client_id"] != client.client_id or found["status"] == "consumed":
        raise OAuthError("invalid_grant", "unknown device_code")
    now = int(time.time())
    if found["expires_at"] < now:
        raise OAuthError("expired_token", "the device code has expired; start again")
    if found["status"] == "denied":
        raise OAuthError("access_denied", "the user denied the request")
    if found["status"] == "pending":
        if now - found["last_poll"] < found["interval"]:
            # RFC 8628 §3.5: polling too fast; the interval grows by 5 s for this device code.
            await services.store.poll_device_code(code_digest, now, found["interval"] + 5)
            raise OAuthError("slow_down", "poll less often")
        await services.store.poll_device_code(code_digest, now, found["interval"])
        raise OAuthError("authorization_pending", "the user has not decided yet")

    grant_row = await services.store.find_grant(found["grant_id"])
    if grant_row is None or grant_row["grant_revoked"]:
        raise OAuthError("invalid_grant", "the grant was revoked")
    user = await current_user(services, grant_row)
    body, access, refresh = mint(services, client, grant_row, user, grant_row["scope"], now,
                                 include_nonce=False, holder=holder)
    if not await services.store.redeem_device_code(code_digest, access.row, refresh,
                                                   binding(client, grant_row, holder)):
        raise OAuthError("invalid_grant", "the device code was already used")
    return body, user.sub
