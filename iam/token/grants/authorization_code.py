"""The authorization code grant (RFC 6749 §4.1.3) with PKCE (RFC 7636 §4.6).

A code is used once. Its use is one transaction that marks it consumed and stores the tokens, taken only
after everything that can fail for outside reasons (the user directory) has answered: a store or peer
outage consumes nothing. A second use revokes what the first one bought (RFC 6749 §4.1.2).
"""

import time
from typing import Any

from iam.config import ClientConfig
from iam.errors import OAuthError, invalid_grant
from iam.observability import audit
from iam.token import pkce
from iam.token.access_tokens import TOKEN_SHAPE, digest
from iam.token.holders import Holder
from iam.token.services import TokenServices
from iam.token.user_tokens import binding, check_bound_key, current_user, mint


async def grant(services: TokenServices, client: ClientConfig, form: dict[str, str],
                holder: Holder | None) -> tuple[dict[str, Any], str]:
    code = form.get("code")
    if code is None:
        raise OAuthError("invalid_request", "code is required")
    if "redirect_uri" not in form:
        raise OAuthError("invalid_request", "redirect_uri is required")
    if not TOKEN_SHAPE.match(code):
        raise invalid_grant("unknown code")
    code_digest = digest(code)
    found = await services.store.find_code(code_digest)
    now = int(time.time())
    if found is None or found["client_id"] != client.client_id:
        raise invalid_grant("unknown code")
    if found["consumed"]:
        await _replayed(services, found)
        raise invalid_grant("the code was already used")
    if found["expires_at"] < now or found["grant_revoked"]:
        raise invalid_grant("the code has expired")
    if found["redirect_uri"] != form["redirect_uri"]:
        raise invalid_grant("redirect_uri differs from the authorization request")
    verifier = form.get("code_verifier")
    if found["code_challenge"] is None:
        if verifier is not None:  # RFC 9700 §4.8.2: PKCE downgrade
            raise invalid_grant("code_verifier sent for a code issued without code_challenge")
    elif not pkce.verifier_matches(verifier, found["code_challenge"]):
        raise invalid_grant("code_verifier does not match code_challenge")

    check_bound_key(client, found, holder, code=True)

    user = await current_user(services, found)
    body, access, refresh = mint(services, client, found, user, found["scope"], now, include_nonce=True, holder=holder)
    if not await services.store.redeem_code(code_digest, access.row, refresh, binding(client, found, holder)):
        await _replayed(services, found)  # lost a race with another use: that is a replay
        raise invalid_grant("the code was already used")
    return body, user.sub


async def _replayed(services: TokenServices, found: dict[str, Any]) -> None:
    """RFC 6749 §4.1.2: a second use of a code revokes what the first one bought."""
    await services.store.revoke_grant(found["grant_id"])
    audit("code.replayed", "failure", actor=found["subject"], client_id=found["client_id"],
          grant_id=found["grant_id"])
