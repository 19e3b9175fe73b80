"""Upstream identity connectors: the authentication role signs people in through the systems they already have.

Each connector turns an upstream sign-in into an `UpstreamIdentity`; what happens next (a user in the
directory keyed by (connector id, subject), a session, the handoff) is the same for every connector.
A connector never stores an upstream password or token.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class UpstreamIdentity:
    """Who the upstream system says signed in. `subject` is stable for the person at that connector."""

    connector_id: str
    subject: str
    username: str | None = None
    email: str | None = None
    email_verified: bool = False
    name: str | None = None
    groups: list[str] = field(default_factory=list)  # already prefixed and filtered per the connector's config
    amr: list[str] = field(default_factory=list)  # how the person authenticated upstream (RFC 8176 values)
    acr: str | None = None


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
