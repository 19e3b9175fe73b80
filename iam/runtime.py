"""What every role's instance holds, whichever role it plays: settings, the role's stores, its key ring, and how it
reaches and verifies its peers. Each role adds its own services on top (`iam/<role>/services.py`), and
`iam/app.py` composes them (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import logging

import httpx
from fastapi import Request

from iam.audit_store import AuditSink
from iam.config import Settings
from iam.keys import KeyRing
from iam.peers import PeerKeys, ServiceIdentity
from iam.roles import Role
from iam.store import Store

log = logging.getLogger(__name__)

CANCEL_ATTEMPTS = 5
CANCEL_WAIT = 1.0  # seconds each cancellation is given


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


async def cancel(*tasks: asyncio.Task[None] | None) -> None:
    """Stop background tasks and wait until they have (a task's own cancellation is not an error).

    A task that lets one cancellation slip (an awaitable finishing at the same moment can swallow it) is cancelled
    again, so that shutting down never waits for ever; one that still runs after that is logged and left behind.
    """
    pending = {task for task in tasks if task is not None}
    finished: set[asyncio.Task[None]] = set()
    for _attempt in range(CANCEL_ATTEMPTS):
        if not pending:
            break
        for task in pending:
            task.cancel()
        done, pending = await asyncio.wait(pending, timeout=CANCEL_WAIT)
        finished |= done
    for task in pending:
        log.warning("background task %s did not stop when cancelled; left running", task.get_name())
    for task in finished:
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error
