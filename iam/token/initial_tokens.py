"""Initial access tokens (RFC 7591 §3): the bearer tokens that may register clients at /oauth/v2/register, each with
the policy its clients must keep to.

Like stored client secrets, a token is `secrets.token_urlsafe(32)` (256 bits), shown once and kept only as its
SHA-256 digest (iam/token/stored_clients.py says why a fast digest suffices for a random secret); it is found by
that digest. Each is issued for a lifetime (at most MAX_TTL) and a number of uses (None: any number until it
expires); a use is consumed only by a successful registration, in the transaction that stores the client
(`ClientRows.insert` with the `InitialTokenUse` that `use` gives).

The administration API (iam/token/admin.py) and `iam clients initial-token` both go through `InitialAccessTokens`.
"""

from __future__ import annotations

import builtins
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, get_args

from iam.config import SCOPE_TOKEN, AuthMethod, ClientConfig, GrantType, check_redirect_uri
from iam.observability import audit
from iam.token.client_metadata import ClientMetadataError
from iam.token.store import InitialTokenRows, InitialTokenUse
from iam.token.stored_clients import SECRET_BYTES, secret_digest

DEFAULT_TTL = 24 * 3600
MAX_TTL = 30 * 86400
DEFAULT_USES = 1
DEFAULT_GRANT_TYPES = ("authorization_code", "refresh_token")
DEFAULT_AUTH_METHODS = ("client_secret_basic", "private_key_jwt", "none")
# The one scope every registered client may have; a policy's `scope` names the others.
ALWAYS_ALLOWED_SCOPE = "openid"
# In a redirect URI pattern, `*` is one run of these: it never crosses `.`, `/`, `?`, `#`, `:` or `@`.
WILDCARD = "[A-Za-z0-9-]+"
_POLICY_MEMBERS = ("grant_types", "redirect_uri_patterns", "scope", "token_endpoint_auth_methods")


class InitialTokenError(ValueError):
    """An initial access token that cannot be issued as asked (the message says why): 400 invalid_request."""


def _strings(data: Mapping[str, Any], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        raise InitialTokenError(f"{name}: a list of strings")
    return tuple(dict.fromkeys(value))


def _pattern(pattern: str) -> re.Pattern[str]:
    return re.compile(WILDCARD.join(re.escape(part) for part in pattern.split("*")))


@dataclass(frozen=True, slots=True)
class RegistrationPolicy:
    """What a client registered with one initial access token may be."""

    grant_types: tuple[str, ...] = DEFAULT_GRANT_TYPES
    redirect_uri_patterns: tuple[str, ...] = ()  # none: any redirect URI ClientConfig accepts
    scope: str = ""  # the scopes allowed besides openid, space-separated
    token_endpoint_auth_methods: tuple[str, ...] = DEFAULT_AUTH_METHODS
    _compiled: tuple[re.Pattern[str], ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_compiled", tuple(_pattern(pattern) for pattern in self.redirect_uri_patterns))

    @classmethod
    def parse(cls, data: Mapping[str, Any]) -> RegistrationPolicy:
        """A policy from its JSON members (unset ones take their defaults); InitialTokenError if one is wrong."""
        grant_types = _strings(data, "grant_types", DEFAULT_GRANT_TYPES)
        for grant_type in grant_types:
            if grant_type not in get_args(GrantType):
                raise InitialTokenError(f"grant_types: {grant_type!r} is not a grant type of this server")
        methods = _strings(data, "token_endpoint_auth_methods", DEFAULT_AUTH_METHODS)
        for method in methods:
            if method not in get_args(AuthMethod):
                raise InitialTokenError(f"token_endpoint_auth_methods: {method!r} is not a method of this server")
        patterns = _strings(data, "redirect_uri_patterns", ())
        for pattern in patterns:
            try:
                check_redirect_uri(pattern.replace("*", "x"))  # a pattern is a redirect URI, bar its wildcards
            except ValueError as exc:
                raise InitialTokenError(f"redirect_uri_patterns: {exc}") from None
        scope = data.get("scope", "")
        if not isinstance(scope, str):
            raise InitialTokenError("scope: space-separated scopes")
        for token in scope.split():
            if not SCOPE_TOKEN.match(token):
                raise InitialTokenError(f"scope: invalid scope token {token!r} (RFC 6749 §3.3)")
        return cls(grant_types, patterns, " ".join(scope.split()), methods)

    def members(self) -> dict[str, Any]:
        return {"grant_types": list(self.grant_types), "redirect_uri_patterns": list(self.redirect_uri_patterns),
                "scope": self.scope, "token_endpoint_auth_methods": list(self.token_endpoint_auth_methods)}

    def to_json(self) -> str:
        return json.dumps(self.members(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RegistrationPolicy:
        return cls.parse(json.loads(text))

    def check(self, client: ClientConfig) -> None:
        """Refuse (ClientMetadataError, RFC 7591 §3.2.2) a client this policy does not allow; the client already
        passed ClientConfig's own rules."""
        for uri in client.redirect_uris:
            if self._compiled and not any(pattern.fullmatch(uri) for pattern in self._compiled):
                raise ClientMetadataError("invalid_redirect_uri",
                                          f"redirect_uris: {uri!r} is not allowed by the initial access token")
        for grant_type in client.grant_types:
            if grant_type not in self.grant_types:
                raise ClientMetadataError("invalid_client_metadata",
                                          f"grant_types: {grant_type} is not allowed by the initial access token")
        if client.token_endpoint_auth_method not in self.token_endpoint_auth_methods:
            raise ClientMetadataError("invalid_client_metadata", f"token_endpoint_auth_method: "
                                      f"{client.token_endpoint_auth_method} is not allowed by the initial access token")
        beyond = client.scopes - set(self.scope.split()) - {ALWAYS_ALLOWED_SCOPE}
        if beyond:
            raise ClientMetadataError("invalid_client_metadata",
                                      f"scope: {' '.join(sorted(beyond))} not allowed by the initial access token")


@dataclass(frozen=True, slots=True)
class InitialAccessToken:
    id: str
    policy: RegistrationPolicy
    uses_left: int | None  # None: any number until it expires
    expires_at: int
    created_by: str
    created_at: int

    def live(self, now: float) -> bool:
        return now < self.expires_at and (self.uses_left is None or self.uses_left > 0)

    def describe(self) -> dict[str, Any]:
        """The token as the administration API and the CLI tell it: never its value."""
        return {"id": self.id, "expires_at": self.expires_at, "uses": self.uses_left, "policy": self.policy.members(),
                "created_by": self.created_by, "created_at": self.created_at}


def _from_row(row: Mapping[str, Any]) -> InitialAccessToken:
    return InitialAccessToken(row["id"], RegistrationPolicy.from_json(row["policy"]), row["uses_left"],
                              row["expires_at"], row["created_by"], row["created_at"])


class InitialAccessTokens:
    """Issue, list, revoke and find initial access tokens; `use` is what a registration consumes."""

    def __init__(self, rows: InitialTokenRows, *, rate_limit: int, clock: Callable[[], float] = time.time) -> None:
        self.rows = rows
        self._rate_limit = rate_limit
        self._clock = clock

    async def issue(self, policy: RegistrationPolicy, *, uses: int | None = DEFAULT_USES, ttl: int = DEFAULT_TTL,
                    actor: str) -> tuple[str, InitialAccessToken]:
        """A new token (its value returned, once) for `ttl` seconds and `uses` registrations (0 or None: any
        number until it expires)."""
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_TTL:
            raise InitialTokenError(f"ttl: seconds, from 1 to {MAX_TTL}")
        if uses is not None and (isinstance(uses, bool) or not isinstance(uses, int) or uses < 0):
            raise InitialTokenError("uses: 0 or more (0 or null: any number until it expires)")
        value = secrets.token_urlsafe(SECRET_BYTES)
        now = int(self._clock())
        token = InitialAccessToken(secrets.token_hex(8), policy, uses or None, now + ttl, actor, now)
        await self.rows.insert({"id": token.id, "digest": secret_digest(value), "policy": policy.to_json(),
                                "uses_left": token.uses_left, "expires_at": token.expires_at,
                                "created_by": actor, "created_at": now})
        audit("client.initial_token_issued", actor=actor, token_id=token.id)
        return value, token

    async def issue_as_asked(self, data: Any, *, actor: str) -> tuple[str, InitialAccessToken]:
        """`issue` as a JSON object asks: the policy's members, `uses` and `ttl` (unset: their defaults); an unknown
        member is refused (a typo must not widen or narrow a policy unnoticed)."""
        if not isinstance(data, dict):
            raise InitialTokenError("the request must be a JSON object")
        unknown = sorted(set(data) - {*_POLICY_MEMBERS, "uses", "ttl"})
        if unknown:
            raise InitialTokenError(f"{unknown[0]}: is not a member of an initial access token's request")
        return await self.issue(RegistrationPolicy.parse(data), uses=data.get("uses", DEFAULT_USES),
                                ttl=data.get("ttl", DEFAULT_TTL), actor=actor)

    async def list(self) -> builtins.list[InitialAccessToken]:
        return [_from_row(row) for row in await self.rows.every()]

    async def revoke(self, token_id: str, *, actor: str) -> bool:
        """False if there is no such token."""
        if not await self.rows.delete(token_id):
            return False
        audit("client.initial_token_revoked", actor=actor, token_id=token_id)
        return True

    async def find(self, value: str) -> InitialAccessToken | None:
        """The live token (unexpired, a use left) of this value, or None."""
        row = await self.rows.by_digest(secret_digest(value))
        token = None if row is None else _from_row(row)
        return token if token is not None and token.live(self._clock()) else None

    def use(self, token: InitialAccessToken) -> InitialTokenUse:
        """One registration with `token`, to be consumed with the client's insert."""
        return InitialTokenUse(token.id, int(self._clock()), self._rate_limit)
