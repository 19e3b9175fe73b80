"""The refresh token grant (RFC 6749 §6) with rotation and reuse detection (RFC 9700 §4.14.2).

Every use spends the token and returns a successor. Presenting a spent token again revokes the whole
grant. Claims are read from the directory at every refresh, so a disabled user stops here.
"""

import time

from iam.config import ClientConfig
from iam.errors import OAuthError
from iam.token.access_tokens import TOKEN_SHAPE, digest
from iam.token.scopes import granted_scope
from iam.token.user_tokens import current_user, mint


def _invalid(description: str) -> OAuthError:
    return OAuthError("invalid_grant", description)


async def grant(iam, client: ClientConfig, form: dict[str, str]) -> dict:
    token = form.get("refresh_token")
    if token is None:
        raise OAuthError("invalid_request", "refresh_token is required")
    if not TOKEN_SHAPE.match(token):
        raise _invalid("unknown refresh token")
    token_digest = digest(token)
    found = await iam.token_store.find_refresh_token(token_digest)
    now = int(time.time())
    if found is None or found["client_id"] != client.client_id:
        raise _invalid("unknown refresh token")  # RFC 9700 §4.14.1: bound to its client
    if found["revoked"] or found["grant_revoked"]:
        raise _invalid("the refresh token was revoked")
    if found["used_at"] is not None:
        await iam.token_store.revoke_grant(found["grant_id"])
        raise _invalid("the refresh token was already used; the grant is revoked")
    if found["expires_at"] < now or found["grant_expires_at"] < now:
        raise _invalid("the refresh token has expired")
    granted = set(found["scope"].split())
    scope = granted_scope(form.get("scope"), frozenset(granted)) if "scope" in form else found["scope"]

    user = await current_user(iam, found)
    body, access, refresh = mint(iam, client, found, user, scope, now, include_nonce=False)
    if not await iam.token_store.rotate_refresh_token(token_digest, now, access.row, refresh):
        await iam.token_store.revoke_grant(found["grant_id"])  # spent concurrently: treat as reuse
        raise _invalid("the refresh token was already used; the grant is revoked")
    return body
