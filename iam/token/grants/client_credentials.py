"""The client credentials grant (RFC 6749 §4.4): the client acts on its own behalf."""

from typing import Any

from iam.config import ClientConfig
from iam.token.holders import Holder
from iam.token.resources import requested_audience
from iam.token.scopes import granted_scope
from iam.token.services import TokenServices


async def grant(services: TokenServices, client: ClientConfig, form: dict[str, str],
                holder: Holder | None) -> tuple[dict[str, Any], str]:
    scope = granted_scope(form.get("scope"), client.scopes)
    audience = requested_audience(form.get("resource"), client)
    # RFC 9068 §2.2: with no resource owner, the subject is the client itself.
    issued = await services.access_tokens.issue(client, subject=client.client_id, scope=scope, audience=audience,
                                                holder=holder)
    body = {"access_token": issued.token, "token_type": issued.token_type, "expires_in": issued.expires_in}
    if scope:
        body["scope"] = scope
    return body, client.client_id
