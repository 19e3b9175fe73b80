"""Upstream identity connectors: the authentication role signs people in through the systems they already have.

Each connector turns an upstream sign-in into an `UpstreamIdentity`; what happens next (a user in the
directory keyed by (connector id, subject), a session, the handoff) is the same for every connector.
A connector never stores an upstream password or token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from iam.peers import UpstreamIdentity  # a shared leaf: the user-management role reads it too


class ConnectorError(Exception):
    """An upstream sign-in failed. `reason` is a short fixed label for metrics and audit (never upstream text
    that could carry a secret); the message is for the operator's log, never shown to the person as is."""

    reason = "error"


class InvalidCredentials(ConnectorError):
    """Wrong username or password, unknown user, or an account the upstream disabled or locked."""

    reason = "invalid_credentials"


class UpstreamRejected(ConnectorError):
    """The upstream answered, but with an error or with something that fails validation."""

    reason = "upstream_rejected"


class ConnectorUnavailable(ConnectorError):
    """The upstream could not be reached in time, or refused iam's own credentials."""

    reason = "unavailable"


@dataclass(frozen=True)
class Check:
    """One step of `iam connectors test`: what was tried, whether it worked, and what the operator should know."""

    step: str
    ok: bool
    detail: str = ""


class PasswordConnector(Protocol):
    """A directory that checks a username and password itself (LDAP / Active Directory)."""

    id: str

    async def authenticate(self, username: str, password: str) -> UpstreamIdentity:
        """The person, if the upstream accepts the password; else InvalidCredentials / ConnectorUnavailable."""
        ...

    async def lookup(self, subject: str) -> UpstreamIdentity | None:
        """The person as the upstream sees them now (service bind), or None if gone or disabled: refresh re-checks."""
        ...

    async def check(self) -> list[Check]: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class PendingUpstream:
    """What iam keeps while the browser is at the upstream: bound to that browser, used once."""

    connector_id: str
    state: str
    nonce: str
    code_verifier: str


class RedirectConnector(Protocol):
    """A provider the browser is sent to (OpenID Connect): start() builds the request, finish() the identity."""

    id: str

    async def start(self, redirect_uri: str, *, login_hint: str | None = None) -> tuple[str, PendingUpstream]:
        """The upstream authorization URL to redirect to (with the sign-in's `login_hint`, OIDC Core §3.1.2.1),
        and what to keep until the callback."""
        ...

    async def finish(self, redirect_uri: str, params: dict[str, str], pending: PendingUpstream) -> UpstreamIdentity:
        """Validate the callback (state, error, code exchange, ID token) and return who signed in."""
        ...

    async def check(self) -> list[Check]: ...

    async def close(self) -> None: ...
