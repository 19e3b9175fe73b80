"""Sign-ins waiting at an upstream provider: kept server-side, used once, within 10 minutes, by one browser.

The browser holds a random value in an HttpOnly cookie; the store keeps only its digest, and the request's
nonce and PKCE verifier sealed with that value (AES-256-GCM), so the store alone cannot finish a sign-in.
A callback with a missing, reused, expired or foreign `state` finds nothing and changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict

from cryptography.exceptions import InvalidTag

from iam.authn.connectors import PendingUpstream
from iam.authn.store import AuthnStore
from iam.security import constant_time_equal, seal, unseal

TTL = 600  # seconds a person has at the upstream provider
PURPOSE = b"iam upstream request v1:"


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


class PendingRequests:
    def __init__(self, store: AuthnStore, clock=time.time) -> None:
        self.store = store
        self.clock = clock

    async def keep(self, browser: str, pending: PendingUpstream, flow: dict[str, str]) -> None:
        state_digest = _digest(pending.state)
        sealed = seal(browser, PURPOSE + state_digest, json.dumps(asdict(pending)).encode())
        await self.store.add_upstream_request(
            state_digest, browser_digest=_digest(browser), connector_id=pending.connector_id, pending=sealed.hex(),
            flow=json.dumps(flow), expires_at=int(self.clock()) + TTL)

    async def take(self, connector_id: str, state: str | None, browser: str | None) -> tuple[PendingUpstream,
                                                                                               dict] | None:
        """The request this browser started at this connector with this state, removed; else None (nothing
        changes: a request tried from another browser stays for its own)."""
        if not state or not browser or len(state) > 512 or len(browser) > 100:
            return None
        state_digest = _digest(state)
        row = await self.store.find_upstream_request(state_digest)
        if (row is None or row.connector_id != connector_id or row.expires_at < self.clock()
                or not constant_time_equal(row.browser_digest.hex(), _digest(browser).hex())):
            return None
        try:
            pending = PendingUpstream(**json.loads(unseal(browser, PURPOSE + state_digest, bytes.fromhex(row.pending))))
        except (InvalidTag, ValueError, TypeError):
            return None
        # single use: only the request that deletes the row goes on
        if not await self.store.take_upstream_request(state_digest) or pending.state != state:
            return None
        return pending, json.loads(row.flow)

    async def purge_expired(self, now: int, batch: int) -> int:
        return await self.store.purge_upstream_requests(now, batch)
