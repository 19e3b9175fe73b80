"""SSO sessions: a random cookie value, kept in the store only as its digest, with absolute and idle expiry."""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass

from iam.authn.store import AuthnStore
from iam.peers import SessionEvents

log = logging.getLogger("iam.authn.sessions")

TOUCH_EVERY = 60  # seconds between last_seen writes: an active session is not a write per request


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


@dataclass(frozen=True)
class Session:
    sid: str
    subject: str
    auth_time: int
    amr: list[str]
    acr: str | None = None
    connector: str | None = None  # the connector the person signed in through; None: iam's own password


class Sessions:
    def __init__(self, store: AuthnStore, ttl: int, idle_ttl: int, clock=time.time) -> None:
        self.store = store
        self.ttl = ttl
        self.idle_ttl = idle_ttl
        self.clock = clock
        self.events: SessionEvents | None = None  # the token role, told of every session that ends (set by connect)

    async def create(self, subject: str, amr: list[str], *, acr: str | None = None,
                     connector: str | None = None) -> tuple[str, Session]:
        """A new session (a fresh id at every sign-in: no session fixation). Returns the cookie value."""
        now = int(self.clock())
        value = secrets.token_urlsafe(32)
        session = Session(sid=secrets.token_urlsafe(16), subject=subject, auth_time=now, amr=amr, acr=acr,
                          connector=connector)
        await self.store.add_session(_digest(value), sid=session.sid, subject=subject, amr=" ".join(amr), acr=acr,
                                     connector=connector, now=now, expires_at=now + self.ttl)
        return value, session

    async def current(self, value: str | None) -> Session | None:
        if not value or len(value) > 100:
            return None
        now = int(self.clock())
        row = await self.store.find_session(_digest(value))
        if row is None or row.revoked or row.expires_at <= now or now - row.last_seen > self.idle_ttl:
            return None
        if now - row.last_seen >= TOUCH_EVERY:
            await self.store.touch_session(row.digest, now)
        return Session(sid=row.sid, subject=row.subject, auth_time=row.auth_time, amr=row.amr.split(), acr=row.acr,
                       connector=row.connector)

    async def count_live(self) -> int:
        now = int(self.clock())
        return await self.store.count_live_sessions(now, seen_after=now - self.idle_ttl)

    async def end(self, value: str | None = None, *, sid: str | None = None) -> None:
        for ended in await self.store.revoke_session(digest=_digest(value) if value else None, sid=sid):
            await self._ended(ended.subject, [ended.sid])

    async def purge_ended(self, now: int, batch: int) -> int:
        """Delete at most `batch` sessions that can no longer be used: revoked, expired, or idle too long."""
        return await self.store.purge_sessions(now, seen_before=now - self.idle_ttl, batch=batch)

    async def end_all(self, subject: str, *, but: str | None = None) -> None:
        """End every session of a subject (but the one with sid `but`, when given)."""
        ended = [row.sid for row in await self.store.revoke_sessions_of(subject, but=but)]
        # Every session ended (sign-out everywhere, a disabled user): the clients are told of all of them, even
        # of grants whose session had already expired here.
        await self._ended(subject, None if but is None else ended)

    async def _ended(self, subject: str, sids: list[str] | None) -> None:
        """Tell the token role (Back-Channel Logout); a failure there never fails the logout itself."""
        if self.events is None or sids == []:
            return
        try:
            await self.events.sessions_ended(subject, sids)
        except Exception as exc:
            log.error("the token role could not be told that sessions ended; no back-channel logout was sent (%s)",
                      exc)
