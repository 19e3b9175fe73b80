"""The client credentials grant (RFC 6749 §4.4): the client acts on its own behalf."""

from iam.config import ClientConfig
from iam.token.scopes import granted_scope


async def grant(iam, client: ClientConfig, form: dict[str, str]) -> tuple[dict, str]:
    scope = granted_scope(form.get("scope"), client.scopes)
    # RFC 9068 §2.2: with no resource owner, the subject is the client itself.
    issued = await iam.access_tokens.issue(client, subject=client.client_id, scope=scope)
    body = {"access_token": issued.token, "token_type": "Bearer", "expires_in": issued.expires_in}
    if scope:
        body["scope"] = scope
    return body, client.client_id
