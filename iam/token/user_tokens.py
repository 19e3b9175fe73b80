"""Tokens for a user's grant: the access token pair, a rotating refresh token, and the ID token."""

from __future__ import annotations

import hmac
from typing import Any

from iam.config import ClientConfig
from iam.errors import OAuthError
from iam.peers import UserClaims
from iam.token.access_tokens import IssuedToken, digest, new_token
from iam.token.claims import ID_TOKEN_TYP, id_token_claims, scoped_claims
from iam.token.holders import Holder, certificate, dpop_key
from iam.token.services import TokenServices
from iam.token.store import RefreshTokenRow


async def current_user(services: TokenServices, grant: dict[str, Any], *, refreshing: bool = False) -> UserClaims:
    """The user's claims as they are now (a disabled user or a changed group takes effect at once)."""
    connector = grant.get("connector")
    if refreshing and connector is not None and _rechecked_upstream(services, connector):
        # Signed in through LDAP: the directory server says again that the person exists and is enabled (and
        # their groups are refreshed from it); an outage fails with temporarily_unavailable, the token unspent.
        if not await services.upstream_checks.recheck(grant["subject"], connector):
            await services.store.revoke_grant(grant["grant_id"])
            raise OAuthError("invalid_grant", "the user is no longer active at the connector they signed in with")
    user = await services.directory.claims(grant["subject"])
    if user is None or not user.active:
        await services.store.revoke_grant(grant["grant_id"])
        raise OAuthError("invalid_grant", "the user is disabled or no longer exists")
    return user


def grant_holder(grant: dict[str, Any]) -> Holder | None:
    """The holder a grant is bound to: the DPoP key of its code (RFC 9449 §10 `dpop_jkt`) or of a public client's
    refresh tokens (§5), or the TLS client certificate of a public client's refresh tokens (RFC 8705 §4)."""
    if grant.get("dpop_jkt") is not None:
        return dpop_key(grant["dpop_jkt"])
    if grant.get("cnf_x5t") is not None:
        return certificate(grant["cnf_x5t"])
    return None


def check_bound_key(client: ClientConfig, grant: dict[str, Any], holder: Holder | None, *, code: bool) -> None:
    """A grant bound to a holder yields tokens only to that holder: its code (a DPoP key), or a public client's
    refresh tokens."""
    bound = grant_holder(grant)
    if bound is None or not (code or client.is_public):
        return
    if holder is None or holder.member != bound.member:
        if bound.is_dpop:
            raise OAuthError("invalid_dpop_proof", "a DPoP proof of the key the grant is bound to is required")
        raise OAuthError("invalid_grant", "the grant is bound to a TLS client certificate: present it")
    if not hmac.compare_digest(holder.thumbprint.encode(), bound.thumbprint.encode()):
        raise OAuthError("invalid_grant", "the grant is bound to another DPoP key" if bound.is_dpop
                         else "the grant is bound to another TLS client certificate")


def binding(client: ClientConfig, grant: dict[str, Any], holder: Holder | None) -> tuple[str, Holder] | None:
    """A public client's refresh tokens are bound to the holder they were issued to (RFC 9449 §5, RFC 8705 §4)."""
    if holder is None or not client.is_public or grant_holder(grant) is not None:
        return None
    return grant["grant_id"], holder


def _rechecked_upstream(services: TokenServices, connector_id: str) -> bool:
    """OIDC connectors are re-checked at the person's next upstream sign-in; LDAP ones (and connectors no longer
    configured, which vouch for nobody) at every refresh."""
    config = next((c for c in services.settings.connectors if c.id == connector_id), None)
    return config is None or config.type == "ldap"


def mint(services: TokenServices, client: ClientConfig, grant: dict[str, Any], user: UserClaims, scope: str,
         now: int, *, include_nonce: bool, holder: Holder | None
         ) -> tuple[dict[str, Any], IssuedToken, RefreshTokenRow | None]:
    """Build the token response and the rows to store with it; all signing happens here, before any write.
    `holder`: the DPoP key or certificate the access token is bound to (RFC 9449 §5, RFC 8705 §3)."""
    scopes = set(scope.split())
    access = services.access_tokens.mint(
        client, user.sub, scope, grant_id=grant["grant_id"],
        claims={"auth_time": grant["auth_time"], **scoped_claims(user, scopes)}, holder=holder,
    )
    body = {"access_token": access.token, "token_type": access.token_type, "expires_in": access.expires_in,
            "scope": scope}
    refresh_row = None
    if "refresh_token" in client.grant_types:
        refresh = new_token()
        refresh_row = RefreshTokenRow(
            digest=digest(refresh),
            grant_id=grant["grant_id"],
            issued_at=now,
            expires_at=min(now + client.refresh_token_ttl, grant["grant_expires_at"]),
        )
        body["refresh_token"] = refresh
    if "openid" in scopes:
        claims = id_token_claims(issuer=services.settings.issuer, client_id=client.client_id, grant=grant, user=user,
                                 access_token=access.token, now=now, ttl=client.id_token_ttl,
                                 include_nonce=include_nonce)
        body["id_token"] = services.keys.sign(claims, alg="RS256", typ=ID_TOKEN_TYP)
    return body, access, refresh_row
