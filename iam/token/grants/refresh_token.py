"""The refresh token grant (RFC 6749 §6) with rotation and reuse detection (RFC 9700 §4.14.2).

Every use spends the token and returns a successor. Presenting a spent token again revokes the whole
grant, except inside the client's reuse window: parallel kubectl calls race on one refresh token, so a
retry of the just-spent token within a few seconds gets the very same successor tokens. The successor is
kept only encrypted under a key derived from the spent token, which the server does not keep.
"""

import json
import time
from typing import Any

from cryptography.exceptions import InvalidTag

from iam.config import ClientConfig
from iam.errors import OAuthError, invalid_grant
from iam.observability import REFRESH_REUSE, audit
from iam.security import seal, unseal
from iam.token.access_tokens import TOKEN_SHAPE, digest
from iam.token.holders import Holder
from iam.token.scopes import granted_scope
from iam.token.services import TokenServices
from iam.token.user_tokens import check_bound_key, current_user, mint

SUCCESSOR = b"iam refresh successor v1"


async def grant(services: TokenServices, client: ClientConfig, form: dict[str, str],
                holder: Holder | None) -> tuple[dict[str, Any], str]:
    token = form.get("refresh_token")
    if token is None:
        raise OAuthError("invalid_request", "refresh_token is required")
    if not TOKEN_SHAPE.match(token):
        raise invalid_grant("unknown refresh token")
    token_digest = digest(token)
    found = await services.store.find_refresh_token(token_digest)
    now = int(time.time())
    if found is None or found["client_id"] != client.client_id:
        raise invalid_grant("unknown refresh token")  # RFC 9700 §4.14.1: bound to its client
    if found["revoked"] or found["grant_revoked"]:
        raise invalid_grant("the refresh token was revoked")
    check_bound_key(client, found, holder, code=False)  # RFC 9449 §5: before a reuse can revoke anything
    if found["used_at"] is not None:
        return await _retry_or_revoke(services, client, found, token, now), found["subject"]
    if found["expires_at"] < now or found["grant_expires_at"] < now:
        raise invalid_grant("the refresh token has expired")
    granted = set(found["scope"].split())
    scope = granted_scope(form.get("scope"), frozenset(granted)) if "scope" in form else found["scope"]

    user = await current_user(services, found, refreshing=True)
    body, access, refresh = mint(services, client, found, user, scope, now, include_nonce=False, holder=holder)
    sealed = seal(token, SUCCESSOR, json.dumps(body).encode()) if client.refresh_reuse_window else None
    if not await services.store.rotate_refresh_token(token_digest, now, access.row, refresh, sealed):
        # Spent concurrently: the winner may have left its successor for us.
        retried = await _retry_or_revoke(services, client, await services.store.find_refresh_token(token_digest),
                                         token, now)
        return retried, user.sub
    return body, user.sub


async def _retry_or_revoke(services: TokenServices, client: ClientConfig, found: dict[str, Any] | None, token: str,
                           now: int) -> dict[str, Any]:
    """A spent token again: the same successor inside the reuse window, else the grant is revoked."""
    if found is not None and not found["grant_revoked"] and found["successor"] is not None and (
        now - found["used_at"] <= client.refresh_reuse_window
    ):
        try:
            body: dict[str, Any] = json.loads(unseal(token, SUCCESSOR, found["successor"]))
        except (InvalidTag, ValueError):
            pass
        else:
            REFRESH_REUSE.labels("window_retry").inc()
            return body
    if found is not None:
        await services.store.revoke_grant(found["grant_id"])
        REFRESH_REUSE.labels("revoked").inc()
        audit("refresh.reuse_detected", "failure", actor=found["subject"], client_id=client.client_id,
              grant_id=found["grant_id"], action="grant revoked")
    raise invalid_grant("the refresh token was already used; the grant is revoked")
