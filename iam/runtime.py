"""What every role's instance holds, whichever role it plays: settings, the role's stores, its key ring, and how it
reaches and verifies its peers. Each role adds its own services on top (`iam/<role>/services.py`), and
`iam/app.py` composes them (docs/architecture.md).
"""

from __future__ import annotations

import httpx
from fastapi import Request

from iam.audit_store import AuditSink
from iam.config import Settings
from iam.keys import KeyRing
from iam.peers import PeerKeys, ServiceIdentity
from iam.roles import Role
from iam.store import Store


class StartupError(Exception):
    """Start-up cannot go on; the message is the one line an operator needs."""


class Shared:
    """The part of a running instance that every role has."""

    settings: Settings
    role: Role
    stores: dict[str, Store]
    keys: KeyRing
    http: httpx.AsyncClient | None  # to the peers, when some role runs in another process
    identity: ServiceIdentity
    peer_keys: PeerKeys
    audit_sink: AuditSink | None
    draining: bool


def shared(request: Request) -> Shared:
    """The running instance that serves this request (set by iam/app.py as `app.state.iam`)."""
    instance: Shared = request.app.state.iam
    return instance
