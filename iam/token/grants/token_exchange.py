"""Token exchange (RFC 8693): a client trades a token it holds for an access token for another audience.

The subject token is an iam access token (the opaque one a client holds, or its JWT, which an API behind the
gateway received; either way its row says whether it is still live) or a workload's token trusted by the
client's policy (`token_exchange.workload_identities`). The result
never widens what the subject had: its scope is within the subject token's (and the client's), its audience one
of the policy's `audiences`, its lifetime within the subject token's; it belongs to the subject token's grant,
so revoking that grant revokes it too. An `actor_token` makes it a delegation: `act` (RFC 8693 §4.1) names the
actor, and the subject token's own `act` nests inside it, so a chain of services stays visible.

Errors (§2.2.2): a subject or actor token that is not live, not verifiable or not acceptable to the policy is
invalid_request; an audience or resource outside the policy invalid_target; a wider scope invalid_scope.
"""

from __future__ import annotations

from typing import Any

from iam.config import ClientConfig
from iam.errors import OAuthError
from iam.formats import jwt_claims
from iam.token.client_assertions import AssertionRejected
from iam.token.holders import Holder
from iam.token.resources import check_resource
from iam.token.scopes import granted_scope
from iam.token.services import TokenServices

ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"


class _Token:
    """A verified subject or actor token: who it is for, and what it allows."""

    def __init__(self, subject: str, claims: dict[str, Any], scope: frozenset[str] | None,
                 expires_at: int | None, grant_id: str | None, client_id: str | None) -> None:
        self.subject = subject
        self.claims = claims
        self.scope = scope  # None: a workload token, which carries no scope
        self.expires_at = expires_at
        self.grant_id = grant_id
        self.client_id = client_id


async def grant(services: TokenServices, client: ClientConfig, form: dict[str, str],
                holder: Holder | None) -> tuple[dict[str, Any], str]:
    policy = client.token_exchange
    assert policy is not None  # the config validator pairs the grant with its policy
    subject = await _token(services, client, form, "subject_token", own_only=False)
    actor = await _token(services, client, form, "actor_token", own_only=True) if "actor_token" in form else None
    if "actor_token_type" in form and actor is None:
        raise OAuthError("invalid_request", "actor_token_type without actor_token")
    requested_type = form.get("requested_token_type", ACCESS_TOKEN_TYPE)
    if requested_type != ACCESS_TOKEN_TYPE:
        raise OAuthError("invalid_request", "only access tokens are issued by exchange")

    audience = _audience(form, policy.audiences)
    ceiling = client.scopes if subject.scope is None else subject.scope & client.scopes
    scope = granted_scope(form.get("scope"), ceiling)  # never wider (invalid_scope)
    act = _act(subject, actor)
    claims = {"act": act} if act is not None else None
    now = int(services.access_tokens.clock())
    ttl = client.access_token_ttl
    if subject.expires_at is not None:
        ttl = min(ttl, subject.expires_at - now)  # it never outlives what it was exchanged for
    if ttl <= 0:
        raise OAuthError("invalid_request", "the subject_token has expired")
    issued = services.access_tokens.mint(client, subject.subject, scope, grant_id=subject.grant_id, claims=claims,
                                         audience=audience, ttl=ttl, holder=holder)
    await services.store.add_access_token(issued.row)
    body: dict[str, Any] = {"access_token": issued.token, "issued_token_type": ACCESS_TOKEN_TYPE,
                            "token_type": issued.token_type, "expires_in": issued.expires_in}
    if scope:
        body["scope"] = scope
    return body, subject.subject


async def _token(services: TokenServices, client: ClientConfig, form: dict[str, str], name: str,
                 own_only: bool) -> _Token:
    token, token_type = form.get(name), form.get(f"{name}_type")
    if token is None or token_type is None:
        raise OAuthError("invalid_request", f"{name} and {name}_type are required")
    if token_type == ACCESS_TOKEN_TYPE:
        # Either form: the opaque token a client holds, or the JWT an API behind the gateway received for it.
        tokens = services.access_tokens
        live = await (tokens.live_jwt(token) if token.count(".") == 2 else tokens.live(token))
        if live is None:  # unknown, expired or revoked
            raise OAuthError("invalid_request", f"the {name} is not an active access token of this server")
        row = live.row
        if row.client_id != client.client_id and (own_only or not _for_apis_of(live.audiences, client)):
            raise OAuthError("invalid_request", f"the {name} was issued to another client")
        claims = jwt_claims(row.jwt)
        scope = frozenset(str(claims.get("scope", "")).split())
        return _Token(row.subject, claims, scope, row.expires_at, row.grant_id, row.client_id)
    if token_type == JWT_TYPE:
        workloads = services.clients.assertions.exchange_workloads.get(client.client_id, [])
        try:
            claims = await services.clients.assertions.workload_claims(workloads, token)
        except AssertionRejected as exc:
            raise OAuthError("invalid_request", f"the {name} does not verify: {exc}") from None
        return _Token(str(claims["sub"]), claims, None, int(claims["exp"]), None, None)
    raise OAuthError("invalid_request", f"unsupported {name}_type")


def _for_apis_of(audiences: frozenset[str], client: ClientConfig) -> bool:
    """A token of another client is acceptable if it was meant for an API this client serves (policy)."""
    assert client.token_exchange is not None
    return bool(audiences & set(client.token_exchange.subject_audiences))


def _audience(form: dict[str, str], allowed: list[str]) -> list[str]:
    """RFC 8693 §2.1 `audience` and `resource` (RFC 8707): each one of the policy's audiences; none: all of them."""
    wanted = [value for value in (form.get("audience"), form.get("resource")) if value is not None]
    if "resource" in form:
        check_resource(form["resource"])
    for value in wanted:
        if value not in allowed:
            raise OAuthError("invalid_target", "the client may not exchange tokens for that audience")
    return list(dict.fromkeys(wanted)) or list(allowed)


def _act(subject: _Token, actor: _Token | None) -> dict[str, Any] | None:
    """RFC 8693 §4.1: the current actor outermost, the earlier ones nested in order."""
    earlier = subject.claims.get("act")
    if actor is None:
        return earlier if isinstance(earlier, dict) else None
    act: dict[str, Any] = {"sub": actor.subject}
    if actor.client_id is not None:
        act["client_id"] = actor.client_id
    if isinstance(earlier, dict):
        act["act"] = earlier
    return act
