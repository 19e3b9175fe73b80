"""The phantom pair: an opaque access token for the client, and the JWT (RFC 9068) that the ingress gets for it.

The JWT is signed once, at issuance, and stored beside the token's digest. Introspection and forward-auth
are then at most one indexed lookup: no signing and no second query on the hot path, and no query at all
while the token's row is in the hot cache (iam/token/hot_cache.py).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, get_args

from joserfc import jwt as jose_jwt
from joserfc.errors import JoseError

from iam.config import AccessTokenAlg, ClientConfig, Settings
from iam.formats import jwt_claims, jwt_payload
from iam.keys import KeyRing, b64url
from iam.token.holders import Holder, holder_of, token_type
from iam.token.hot_cache import HotCache
from iam.token.store import AccessTokenRow, TokenStore

TOKEN_BYTES = 32  # 256 bits of randomness
TOKEN_SHAPE = re.compile(r"^[A-Za-z0-9_-]{43}$")  # base64url of 32 bytes, unpadded


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def introspection_members(jwt: str) -> dict[str, Any]:
    """The RFC 7662 answer for a live token: the claims of its JWT (`cnf` included), plus `active` and
    `token_type`."""
    claims = jwt_claims(jwt)
    return {"active": True, **claims, "token_type": token_type(holder_of(claims))}


def introspection_json(jwt: str) -> bytes:
    """`introspection_members`, serialised. A bearer token's answer is its JWT's own payload (compact JSON, from
    this server's signer) between `active` and `token_type`: neither parsed nor encoded again. A token with a
    `cnf` takes the long way, its token_type depending on what it is bound to."""
    payload = jwt_payload(jwt)
    if b'"cnf"' in payload:
        return json.dumps(introspection_members(jwt), separators=(",", ":")).encode()
    return b'{"active":true,' + payload[1:-1] + b',"token_type":"Bearer"}'


class LiveToken:
    """A live token's row, and what the hot path derives from it, each built at most once per cache entry."""

    __slots__ = ("row", "until", "_introspection", "_audiences", "_holder")

    def __init__(self, row: AccessTokenRow, until: float) -> None:
        self.row = row
        self.until = until  # epoch seconds it may be served from the cache until
        self._introspection: bytes | None = None
        self._audiences: frozenset[str] | None = None
        self._holder: Holder | None | bool = False  # False: not read yet

    @property
    def holder(self) -> Holder | None:
        """The DPoP key or certificate the token is bound to (`cnf`), or None for a bearer token; read once per
        entry."""
        if self._holder is False:
            self._holder = holder_of(jwt_claims(self.row.jwt))
        return self._holder  # type: ignore[return-value]

    @property
    def jwt(self) -> str:
        return self.row.jwt

    @property
    def audiences(self) -> frozenset[str]:
        """The JWT's `aud` (RFC 9068 §3), as a set."""
        if self._audiences is None:
            aud = jwt_claims(self.row.jwt).get("aud")
            self._audiences = frozenset([aud] if isinstance(aud, str) else aud or ())
        return self._audiences

    @property
    def introspection_json(self) -> bytes:
        """The RFC 7662 answer, serialised once per cache entry (`introspection_json`)."""
        if self._introspection is None:
            self._introspection = introspection_json(self.row.jwt)
        return self._introspection


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_in: int
    scope: str
    jwt: str
    row: AccessTokenRow
    token_type: str = "Bearer"


class AccessTokens:
    def __init__(self, settings: Settings, keys: KeyRing, store: TokenStore,
                 clock: Callable[[], float] = time.time, cache: HotCache[LiveToken] | None = None,
                 client_known: Callable[[str], object | None] | None = None) -> None:
        self.issuer = settings.issuer
        # The registry's lookup: a token of a client that is no longer known (deleted, disabled) is not live.
        self.client_known = client_known
        self.alg = settings.keys.access_token_alg
        self.keys = keys
        self.store = store
        self.clock = clock
        # Live rows by digest; None, or a disabled cache, means every lookup goes to the store.
        self.cache: HotCache[LiveToken] = cache if cache is not None else HotCache(enabled=False)

    def mint(
        self, client: ClientConfig, subject: str, scope: str, *, grant_id: str | None = None,
        claims: dict[str, Any] | None = None, audience: list[str] | None = None, ttl: int | None = None,
        holder: Holder | None = None,
    ) -> IssuedToken:
        """A new opaque token and its signed JWT; nothing is stored yet (see `issue`, or a grant's transaction).
        `audience` narrows the client's (RFC 8707 resource indicators), `ttl` its token lifetime; `holder` binds it
        to a DPoP key or a TLS client certificate (RFC 9449 §6.1 `cnf.jkt`, RFC 8705 §3.1 `cnf.x5t#S256`)."""
        now = int(self.clock())
        ttl = client.access_token_ttl if ttl is None else ttl
        audience = client.audience if audience is None else audience
        token = new_token()
        key = digest(token)
        payload = {
            "iss": self.issuer,
            "sub": subject,
            # RFC 9068 §3: aud is required; without a configured audience the token is for this issuer.
            "aud": audience[0] if len(audience) == 1 else (audience or self.issuer),
            "client_id": client.client_id,
            "iat": now,
            "exp": now + ttl,
            # The row's key (a hash: it reveals nothing of the token), so the JWT leads back to its row
            # and whether it is still live (`live_jwt`: token exchange takes either form).
            "jti": b64url(key),
            **(claims or {}),
        }
        if scope:
            payload["scope"] = scope
        if holder is not None:
            payload["cnf"] = holder.cnf
        jwt = self.keys.sign(payload, alg=self.alg, typ="at+jwt")
        row = AccessTokenRow(
            digest=key,
            client_id=client.client_id,
            subject=subject,
            expires_at=now + ttl,
            revoked=False,
            jwt=jwt,
            grant_id=grant_id,
        )
        return IssuedToken(token=token, expires_in=ttl, scope=scope, jwt=jwt, row=row, token_type=token_type(holder))

    async def issue(self, client: ClientConfig, subject: str, scope: str,
                    audience: list[str] | None = None, holder: Holder | None = None) -> IssuedToken:
        issued = self.mint(client, subject, scope, audience=audience, holder=holder)
        await self.store.add_access_token(issued.row)
        return issued

    async def live(self, token: str) -> LiveToken | None:
        """A live token (its stored row); None for unknown, malformed, expired or revoked ones.

        From the hot cache when it holds the token and is on; else one indexed lookup, whose live result is
        cached (never a negative one).
        """
        if not TOKEN_SHAPE.match(token):
            return None  # not one of ours: no store lookup for garbage
        return await self._live(hashlib.sha256(token.encode()).digest())

    async def live_jwt(self, token: str) -> LiveToken | None:
        """The live token whose JWT this is (signed here, an access token of this issuer); None otherwise."""
        try:
            decoded = jose_jwt.decode(token, self.keys.public_set, algorithms=list(get_args(AccessTokenAlg)))
        except (JoseError, ValueError, TypeError):
            return None
        jti = decoded.claims.get("jti")
        if decoded.header.get("typ") != "at+jwt" or decoded.claims.get("iss") != self.issuer or not (
                isinstance(jti, str) and TOKEN_SHAPE.match(jti)):
            return None
        found = await self._live(base64.urlsafe_b64decode(jti + "="))
        # The row holds the very JWT: anything else signed with that jti (there is nothing) is not it.
        return found if found is not None and found.row.jwt == token else None

    async def _live(self, key: bytes) -> LiveToken | None:
        cache = self.cache
        now = self.clock()
        entry = cache.get(key, now)
        if entry is not None:
            return entry if self._client_live(entry.row.client_id) else None
        generation = cache.generation  # read before the lookup: an eviction meanwhile voids this fill
        row = await self.store.find_access_token(key)
        now = self.clock()
        if row is None or row.revoked or row.expires_at <= now or not self._client_live(row.client_id):
            return None
        entry = LiveToken(row, cache.until(row.expires_at, now))
        cache.put(key, entry, generation, now)
        return entry

    def _client_live(self, client_id: str) -> bool:
        return self.client_known is None or self.client_known(client_id) is not None

    async def active(self, token: str) -> AccessTokenRow | None:
        """The stored row of a live token; None for unknown, malformed, expired or revoked ones."""
        found = await self.live(token)
        return None if found is None else found.row

    async def introspect(self, token: str) -> dict[str, Any] | None:
        """RFC 7662 members of a live token, or None."""
        row = await self.active(token)
        return None if row is None else introspection_members(row.jwt)

    async def revoke_subject(self, sub: str) -> None:
        """A disabled or deleted user (told by the user-management role): every grant and token of theirs ends."""
        await self.store.revoke_subject(sub)

    async def revoke(self, token: str, client: ClientConfig) -> bool:
        """Revoke an access or refresh token of this client (RFC 7009); a refresh token takes its grant along."""
        if not TOKEN_SHAPE.match(token):
            return False
        return await self.store.revoke_token(digest(token), client.client_id)
