"""How the roles talk to each other (docs/architecture.md, "The runtime"): one interface, two implementations.

In one process (`all`) a call is a plain function call into the other role's service. Apart, it is an
HTTP call to the other role's `/internal/v1/...` API, authenticated with a service assertion: a JWT of at
most 60 s that the calling role signs with its own key (iss `iam:<role>`, aud `iam:<callee role>`), which
the callee verifies against the caller's JWKS at `<caller>/internal/v1/jwks`. No shared secret, and no role
ever reads another role's tables.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from iam.errors import PasswordRejected, PeerRejected, PeerUnavailable, UserDisabled
from iam.keys import KeyRing
from iam.observability import inject_trace_context
from iam.roles import Role

log = logging.getLogger("iam.peers")

ASSERTION_TTL = 60
SERVICE_TYP = "iam-service+jwt"
HANDOFF_TYP = "iam-handoff+jwt"  # authentication -> token, through the browser, bound to one pending request
LOGOUT_TYP = "iam-logout+jwt"  # token -> authentication, through the browser: end this session, return here
MAX_SIDS = 1000  # sessions named in one call of POST /internal/v1/sessions/ended
# What the authentication role tells the directory about an upstream sign-in (`UpstreamIdentity`).
UPSTREAM_FIELDS = ("connector_id", "subject", "username", "email", "email_verified", "name", "groups")


@dataclass(frozen=True)
class UserClaims:
    """What the user-management role tells the others about a user: OIDC standard claim names."""

    sub: str
    active: bool
    preferred_username: str
    name: str | None = None
    given_name: str | None = None
    family_name: str | None = None
    email: str | None = None
    email_verified: bool = False
    groups: list[str] = field(default_factory=list)
    updated_at: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class UpstreamIdentity:
    """Who an upstream system says signed in (iam/authn/connectors/ make it; the user-management role keeps the
    person's account, iam/users/upstream.py). `subject` is stable for the person at that connector."""

    connector_id: str
    subject: str
    username: str | None = None
    email: str | None = None
    email_verified: bool = False
    name: str | None = None
    groups: list[str] = field(default_factory=list)  # already prefixed and filtered per the connector's config
    amr: list[str] = field(default_factory=list)  # how the person authenticated upstream (RFC 8176 values)
    acr: str | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UpstreamIdentity:
        """From the internal API's JSON body (the UPSTREAM_FIELDS); raises ValueError on anything malformed."""
        def required(key: str) -> str:
            value = data.get(key)
            if not isinstance(value, str) or not value or len(value) > 1024:
                raise ValueError(f"{key} must be a non-empty string")
            return value

        def text(key: str) -> str | None:
            return None if data.get(key) is None else required(key)

        groups = data.get("groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ValueError("groups must be a list of strings")
        email_verified = data.get("email_verified", False)
        if not isinstance(email_verified, bool):
            raise ValueError("email_verified must be a boolean")
        return cls(required("connector_id"), required("subject"), text("username"), text("email"),
                   email_verified, text("name"), groups)


# The interfaces one role has of another. Each has two implementations, checked against it by mypy: the other
# role's own service, in one process (`all`; wired in iam/app.py), and the HTTP client below (`Remote...`).
class Directory(Protocol):
    """The user-management role, as the token and authentication roles see it (iam.users.directory)."""

    async def claims(self, sub: str) -> UserClaims | None: ...

    async def find(self, username: str) -> UserClaims | None: ...

    async def find_by_email(self, email: str) -> UserClaims | None:
        """The one user whose verified primary address this is; None when there is none, or several."""

    async def sign_out_everywhere(self, sub: str, actor: str = "operator") -> None:
        """End every session and revoke every grant of the user (`iam users sign-out`, a password reset)."""

    async def confirm_email(self, sub: str, email: str) -> bool:
        """Mark the user's address verified if it is still `email` (a verification link); whether it was."""


class UpstreamAccounts(Protocol):
    """The user-management role's accounts of people who sign in through a connector (iam.users.upstream)."""

    async def provision(self, identity: UpstreamIdentity, link_by: str | None = None) -> UserClaims:
        """The user for an upstream sign-in (an `UpstreamIdentity`): found by its link, linked, or created;
        raises UserDisabled for a user disabled in the directory."""

    async def upstream_subject(self, sub: str, connector_id: str) -> str | None: ...


class UpstreamChecks(Protocol):
    """The authentication role, as the token role sees it at refresh: may a person who signed in through a
    connector go on (LDAP: looked up again with the service bind)?"""

    async def recheck(self, sub: str, connector_id: str) -> bool: ...


class Credentials(Protocol):
    """The authentication role's credential store, as the user-management role sees it
    (iam.authn.credentials)."""

    async def set_password(self, sub: str, password: str) -> None:
        """Raises PasswordRejected when the password does not meet the policy."""

    async def remove(self, sub: str) -> None: ...

    async def reset_second_factor(self, sub: str) -> bool: ...

    async def end_sessions(self, sub: str) -> None: ...

    async def send_verification(self, sub: str) -> bool:
        """Mail the user a link that verifies their address; False when mail is off or there is no address."""


@dataclass(frozen=True, slots=True)
class ClientView:
    """What the sign-in pages need of a client: its name, the connectors it offers, whether it asks for consent."""

    client_id: str
    client_name: str | None = None
    connectors: tuple[str, ...] | None = None
    require_consent: bool = False

    @classmethod
    def of(cls, client: Any) -> ClientView:
        """The view of a ClientConfig."""
        connectors = None if client.connectors is None else tuple(client.connectors)
        return cls(client.client_id, client.client_name, connectors, client.require_consent)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClientView:
        connectors = data.get("connectors")
        return cls(str(data["client_id"]), data.get("client_name"),
                   None if connectors is None else tuple(str(c) for c in connectors), bool(data.get("require_consent")))


class ClientViews(Protocol):
    """The token role's stored clients, as the authentication role's pages see them (in memory: a page asks
    synchronously)."""

    def get(self, client_id: str) -> ClientView | None: ...


class Tokens(Protocol):
    """The token role, as the other roles see it: what an access token stands for, and the end of a user's
    grants (iam.token.access_tokens)."""

    async def introspect(self, token: str) -> dict[str, Any] | None: ...

    async def revoke_subject(self, sub: str) -> None: ...


class SessionEvents(Protocol):
    """The token role, told by the authentication role that SSO sessions ended, so that the clients that took
    part are told in turn (iam.token.backchannel)."""

    async def sessions_ended(self, sub: str, sids: list[str] | None) -> int:
        """These sessions of `sub` ended, or all of them (`sids` None); how many logout tokens were queued."""


class AppAccess(Protocol):
    """The token role's account of a person's applications (iam.token.app_access)."""

    async def applications(self, sub: str) -> list[dict[str, Any]]: ...

    async def remove(self, sub: str, client_id: str) -> int: ...


class DeviceApprovals(Protocol):
    """The token role's pending device codes, as the authentication role's verification page sees them
    (iam.token.device_codes)."""

    async def device_lookup(self, user_code: str) -> dict[str, Any] | None: ...

    async def device_decide(self, user_code: str, approve: bool, session: dict[str, Any]) -> bool: ...


def role_id(role: Role) -> str:
    return f"iam:{role.value}"


class ServiceIdentity:
    """Signs what this role asserts to another: service assertions, handoffs, logout requests."""

    def __init__(self, role: Role, keys: KeyRing) -> None:
        self.role = role
        self.keys = keys
        self._cache: dict[str, tuple[str, float]] = {}

    def sign(self, audience: Role, typ: str, claims: dict[str, Any] | None = None, *, issuer: Role | None = None,
             ttl: int = ASSERTION_TTL) -> str:
        """A JWT from this role (or, in one process, the named role) to `audience`, valid for `ttl` seconds."""
        now = int(time.time())
        payload = {"iss": role_id(issuer or self.role), "aud": role_id(audience), "iat": now, "exp": now + ttl,
                   "jti": uuid.uuid4().hex, **(claims or {})}
        return self.keys.sign(payload, alg="ES256", typ=typ)

    def assertion(self, audience: Role) -> str:
        """A service assertion for calls to `audience`, reused until shortly before it expires."""
        cached = self._cache.get(audience.value)
        if cached and cached[1] - time.time() > 15:
            return cached[0]
        token = self.sign(audience, SERVICE_TYP)
        self._cache[audience.value] = (token, time.time() + ASSERTION_TTL)
        return token


class PeerKeys:
    """Verifies JWTs signed by other roles, with their JWKS fetched from their internal URL and cached."""

    def __init__(self, local: KeyRing, urls: dict[Role, str], http: httpx.AsyncClient | None) -> None:
        self.local = local
        self.urls = urls
        self.http = http
        self._sets: dict[Role, tuple[KeySet, float]] = {}
        self._lock = asyncio.Lock()

    async def keyset(self, role: Role, refresh: bool = False) -> KeySet:
        if role not in self.urls:  # the role runs in this process: its keys are ours
            return self.local.public_set
        cached = self._sets.get(role)
        if cached and not refresh and time.monotonic() - cached[1] < 300:
            return cached[0]
        async with self._lock:
            cached = self._sets.get(role)
            if cached and time.monotonic() - cached[1] < (5 if refresh else 300):
                return cached[0]  # another task fetched it meanwhile; refetch at most every 5 s
            assert self.http is not None  # a remote peer's URL comes with the client to reach it
            try:
                response = await self.http.get(f"{self.urls[role]}/internal/v1/jwks", timeout=5)
                response.raise_for_status()
                keys = KeySet.import_key_set(response.json())
            except (httpx.HTTPError, ValueError) as exc:
                raise PeerUnavailable(f"cannot fetch the {role.value} role's keys: {exc}") from None
            self._sets[role] = (keys, time.monotonic())
            return keys

    async def verify(self, token: str, *, issuer: Role, audience: str, typ: str,
                     max_ttl: int = ASSERTION_TTL) -> dict[str, Any]:
        """Verify signature, typ, iss, aud and lifetime; raise PeerRejected with the reason."""
        for refresh in (False, True):  # a failure may mean the peer rotated its keys: refetch once
            keys = await self.keyset(issuer, refresh=refresh)
            try:
                decoded = jwt.decode(token, keys, algorithms=["ES256", "RS256"])
                break
            except (JoseError, ValueError, TypeError) as exc:
                if refresh or issuer not in self.urls:
                    raise PeerRejected(f"bad signature or malformed token ({exc.__class__.__name__})") from None
        if decoded.header.get("typ") != typ:
            raise PeerRejected("wrong token type")
        claims = decoded.claims
        now = time.time()
        if claims.get("iss") != role_id(issuer):
            raise PeerRejected("wrong issuer")
        if claims.get("aud") != audience:
            raise PeerRejected("wrong audience")
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, int) or not isinstance(iat, int) or exp <= now or exp - iat > max_ttl or iat > now + 30:
            raise PeerRejected("expired or over-long assertion")
        return claims

    async def verify_own(self, token: str, *, role: Role, typ: str, max_ttl: int) -> dict[str, Any] | None:
        """What `role` signed for itself (a cookie, a link), or None when it is not genuine or has expired."""
        try:
            return await self.verify(token, issuer=role, audience=role_id(role), typ=typ, max_ttl=max_ttl)
        except PeerRejected:
            return None


class _Remote:
    """An HTTP client for another role's internal API, authenticated with this role's service assertion."""

    def __init__(self, http: httpx.AsyncClient, base_url: str, identity: ServiceIdentity, role: Role) -> None:
        self.http = http
        self.base = base_url.rstrip("/")
        self.identity = identity
        self.role = role

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = {**kwargs.pop("headers", {}), "Authorization": f"Bearer {self.identity.assertion(self.role)}"}
        inject_trace_context(headers)
        try:
            response = await self.http.request(method, f"{self.base}{path}", headers=headers, timeout=10, **kwargs)
        except httpx.HTTPError as exc:
            raise PeerUnavailable(f"the {self.role.value} role did not answer ({exc.__class__.__name__})") from None
        if response.status_code >= 500:
            raise PeerUnavailable(f"the {self.role.value} role answered {response.status_code}")
        if response.status_code in (401, 403):
            raise PeerRejected(f"the {self.role.value} role refused this role's assertion")
        return response


class RemoteDirectory(_Remote):
    async def claims(self, sub: str) -> UserClaims | None:
        response = await self.call("GET", f"/internal/v1/users/{_segment(sub)}")
        return None if response.status_code == 404 else UserClaims(**response.json())

    async def find(self, username: str) -> UserClaims | None:
        response = await self.call("GET", "/internal/v1/users", params={"username": username})
        return None if response.status_code == 404 else UserClaims(**response.json())

    async def find_by_email(self, email: str) -> UserClaims | None:
        response = await self.call("GET", "/internal/v1/users", params={"email": email})
        return None if response.status_code == 404 else UserClaims(**response.json())

    async def sign_out_everywhere(self, sub: str, actor: str = "operator") -> None:
        response = await self.call("POST", f"/internal/v1/users/{_segment(sub)}/sign-out", json={"actor": actor})
        response.raise_for_status()

    async def confirm_email(self, sub: str, email: str) -> bool:
        response = await self.call("POST", f"/internal/v1/users/{_segment(sub)}/email-verified", json={"email": email})
        return response.status_code == 204

    async def provision(self, identity: UpstreamIdentity, link_by: str | None = None) -> UserClaims:
        body = {"identity": {key: getattr(identity, key) for key in UPSTREAM_FIELDS}, "link_by": link_by}
        response = await self.call("POST", "/internal/v1/upstream-identities", json=body)
        if response.status_code == 409 and response.json().get("error") == "account_disabled":
            raise UserDisabled("the user is disabled in the directory")
        if response.status_code != 200:
            raise PeerUnavailable(f"the {self.role.value} role answered {response.status_code}")
        return UserClaims(**response.json())

    async def upstream_subject(self, sub: str, connector_id: str) -> str | None:
        response = await self.call("GET", f"/internal/v1/users/{_segment(sub)}/upstream/{_segment(connector_id)}")
        return response.json()["subject"] if response.status_code == 200 else None


class RemoteCredentials(_Remote):
    async def set_password(self, sub: str, password: str) -> None:
        response = await self.call("PUT", f"/internal/v1/credentials/{_segment(sub)}", json={"password": password})
        if response.status_code == 400:
            body = response.json()  # an authentication role of the previous release answers {"detail": ...}
            raise PasswordRejected(body.get("error_description") or body.get("detail") or "password rejected")
        response.raise_for_status()

    async def end_sessions(self, sub: str) -> None:
        response = await self.call("DELETE", f"/internal/v1/sessions/{_segment(sub)}")
        if response.status_code != 204:
            raise PeerUnavailable(f"the {self.role.value} role answered {response.status_code}")

    async def remove(self, sub: str) -> None:
        response = await self.call("DELETE", f"/internal/v1/credentials/{_segment(sub)}")
        if response.status_code not in (204, 404):
            raise PeerUnavailable(f"the {self.role.value} role answered {response.status_code}")

    async def send_verification(self, sub: str) -> bool:
        response = await self.call("POST", f"/internal/v1/credentials/{_segment(sub)}/verification")
        return response.status_code == 204

    async def reset_second_factor(self, sub: str) -> bool:
        response = await self.call("DELETE", f"/internal/v1/credentials/{_segment(sub)}/second-factor")
        if response.status_code not in (204, 404):
            raise PeerUnavailable(f"the {self.role.value} role answered {response.status_code}")
        return response.status_code == 204


class RemoteUpstreamChecks(_Remote):
    async def recheck(self, sub: str, connector_id: str) -> bool:
        response = await self.call("POST", "/internal/v1/upstream-identities/recheck",
                                   json={"sub": sub, "connector": connector_id})
        if response.status_code != 200:
            raise PeerUnavailable(f"the {self.role.value} role answered {response.status_code}")
        return response.json()["active"] is True


class RemoteTokens(_Remote):
    async def client_views(self, etag: str | None) -> tuple[str | None, list[ClientView] | None]:
        """The token role's stored clients (ETag, views); (etag, None) while they are unchanged since `etag`."""
        response = await self.call("GET", "/internal/v1/clients", headers={"If-None-Match": etag} if etag else {})
        if response.status_code == 304:
            return etag, None
        if response.status_code != 200:
            raise PeerUnavailable(f"the {self.role.value} role answered {response.status_code}")
        return response.headers.get("etag"), [ClientView.from_json(c) for c in response.json()["clients"]]

    async def revoke_subject(self, sub: str) -> None:
        response = await self.call("POST", f"/internal/v1/subjects/{_segment(sub)}/revoke")
        if response.status_code != 204:
            raise PeerUnavailable(f"the {self.role.value} role answered {response.status_code}")

    async def introspect(self, token: str) -> dict[str, Any] | None:
        response = await self.call("POST", "/internal/v1/introspect", json={"token": token})
        body = response.json()
        return body if body.get("active") else None

    async def applications(self, sub: str) -> list[dict[str, Any]]:
        response = await self.call("GET", f"/internal/v1/subjects/{_segment(sub)}/applications")
        if response.status_code != 200:
            raise PeerUnavailable(f"the {self.role.value} role answered {response.status_code}")
        applications: list[dict[str, Any]] = response.json()["applications"]
        return applications

    async def remove(self, sub: str, client_id: str) -> int:
        path = f"/internal/v1/subjects/{_segment(sub)}/applications/{_segment(client_id)}"
        response = await self.call("DELETE", path)
        if response.status_code != 200:
            raise PeerUnavailable(f"the {self.role.value} role answered {response.status_code}")
        removed: int = response.json()["removed"]
        return removed

    async def sessions_ended(self, sub: str, sids: list[str] | None) -> int:
        queued = 0
        for batch in [None] if sids is None else [sids[i:i + MAX_SIDS] for i in range(0, len(sids), MAX_SIDS)]:
            response = await self.call("POST", "/internal/v1/sessions/ended", json={"sub": sub, "sids": batch})
            if response.status_code != 202:
                raise PeerUnavailable(f"the {self.role.value} role answered {response.status_code}")
            queued += response.json()["queued"]
        return queued

    async def device_lookup(self, user_code: str) -> dict[str, Any] | None:
        response = await self.call("GET", f"/internal/v1/device/{_segment(user_code)}")
        return response.json() if response.status_code == 200 else None

    async def device_decide(self, user_code: str, approve: bool, session: dict[str, Any]) -> bool:
        response = await self.call("POST", f"/internal/v1/device/{_segment(user_code)}",
                                   json={"approve": approve, "session": session})
        return response.status_code == 200


def _segment(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


# The remote implementations, checked against the interfaces (the in-process ones are, where iam/app.py wires them).
_REMOTE: tuple[type[Directory], type[UpstreamAccounts], type[Credentials], type[Tokens], type[AppAccess],
               type[DeviceApprovals], type[SessionEvents], type[UpstreamChecks]] = (
    RemoteDirectory, RemoteDirectory, RemoteCredentials, RemoteTokens, RemoteTokens, RemoteTokens, RemoteTokens,
    RemoteUpstreamChecks)
