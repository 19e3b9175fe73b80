"""The authorization code grant (RFC 6749 §4.1.3) with PKCE (RFC 7636 §4.6).

A code is used once. Its use is one transaction that marks it consumed and stores the tokens, taken only
after everything that can fail for outside reasons (the user directory) has answered: a store or peer
outage consumes nothing. A second use revokes what the first one bought (RFC 6749 §4.1.2).
"""

import re
import time

from authlib.oauth2.rfc7636 import create_s256_code_challenge

from iam.config import ClientConfig
from iam.errors import OAuthError
from iam.observability import audit
from iam.security import constant_time_equal
from iam.token.access_tokens import TOKEN_SHAPE, digest
from iam.token.user_tokens import current_user, mint

VERIFIER = re.compile(r"^[A-Za-z0-9._~-]{43,128}$")  # RFC 7636 §4.1


def _invalid(description: str) -> OAuthError:
    return OAuthError("invalid_grant", description)


async def grant(iam, client: ClientConfig, form: dict[str, str]) -> tuple[dict, str]:
    code = form.get("code")
    if code is None:
        raise OAuthError("invalid_request", "code is required")
    if "redirect_uri" not in form:
        raise OAuthError("invalid_request", "redirect_uri is required")
    if not TOKEN_SHAPE.match(code):
        raise _invalid("unknown code")
    code_digest = digest(code)
    found = await iam.token_store.find_code(code_digest)
    now = int(time.time())
    if found is None or found["client_id"] != client.client_id:
        raise _invalid("unknown code")
    if found["consumed"]:
        await _replayed(iam, found)
        raise _invalid("the code was already used")
    if found["expires_at"] < now or found["grant_revoked"]:
        raise _invalid("the code has expired")
    if found["redirect_uri"] != form["redirect_uri"]:
        raise _invalid("redirect_uri differs from the authorization request")
    verifier = form.get("code_verifier")
    if found["code_challenge"] is None:
        if verifier is not None:  # RFC 9700 §4.8.2: PKCE downgrade
            raise _invalid("code_verifier sent for a code issued without code_challenge")
    elif verifier is None or not VERIFIER.match(verifier) or not constant_time_equal(
        create_s256_code_challenge(verifier), found["code_challenge"]
    ):
        raise _invalid("code_verifier does not match code_challenge")

    user = await current_user(iam, found)
    body, access, refresh = mint(iam, client, found, user, found["scope"], now, include_nonce=True)
    if not await iam.token_store.redeem_code(code_digest, access.row, refresh):
        await _replayed(iam, found)  # lost a race with another use: that is a replay
        raise _invalid("the code was already used")
    return body, user.sub


async def _replayed(iam, found: dict) -> None:
    """RFC 6749 §4.1.2: a second use of a code revokes what the first one bought."""
    await iam.token_store.revoke_grant(found["grant_id"])
    audit("code.replayed", "failure", actor=found["subject"], client_id=found["client_id"],
          grant_id=found["grant_id"])
