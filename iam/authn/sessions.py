"""SSO sessions: a random cookie value, kept in the store only as its digest, with absolute and idle expiry."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from iam.authn.store import sessions
from iam.store import doomed

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
    def __init__(self, engine: AsyncEngine, ttl: int, idle_ttl: int, clock=time.time) -> None:
        self.engine = engine
        self.ttl = ttl
        self.idle_ttl = idle_ttl
        self.clock = clock

    async def create(self, subject: str, amr: list[str], *, acr: str | None = None,
                     connector: str | None = None) -> tuple[str, Session]:
        """A new session (a fresh id at every sign-in: no session fixation). Returns the cookie value."""
        now = int(self.clock())
        value = secrets.token_urlsafe(32)
        session = Session(sid=secrets.token_urlsafe(16), subject=subject, auth_time=now, amr=amr, acr=acr,
                          connector=connector)
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(sessions).values(
                    digest=_digest(value), sid=session.sid, subject=subject, auth_time=now, amr=" ".join(amr),
                    acr=acr, connector=connector, created_at=now, last_seen=now, expires_at=now + self.ttl,
                    revoked=False,
                )
            )
        return value, session

    async def current(self, value: str | None) -> Session | None:
        if not value or len(value) > 100:
            return None
        now = int(self.clock())
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(sessions).where(sessions.c.digest == _digest(value)))).first()
        if row is None or row.revoked or row.expires_at <= now or now - row.last_seen > self.idle_ttl:
            return None
        if now - row.last_seen >= TOUCH_EVERY:
            async with self.engine.begin() as conn:
                await conn.execute(update(sessions).where(sessions.c.digest == row.digest).values(last_seen=now))
        return Session(sid=row.sid, subject=row.subject, auth_time=row.auth_time, amr=row.amr.split(), acr=row.acr,
                       connector=row.connector)

    async def count_live(self) -> int:
        now = int(self.clock())
        async with self.engine.connect() as conn:
            return (await conn.execute(
                select(func.count()).select_from(sessions)
                .where(sessions.c.revoked.is_(False), sessions.c.expires_at > now,
                       sessions.c.last_seen > now - self.idle_ttl)
            )).scalar_one()

    async def end(self, value: str | None = None, *, sid: str | None = None) -> None:
        condition = sessions.c.digest == _digest(value) if value else sessions.c.sid == sid
        async with self.engine.begin() as conn:
            await conn.execute(update(sessions).where(condition).values(revoked=True))

    async def purge_ended(self, now: int, batch: int) -> int:
        """Delete at most `batch` sessions that can no longer be used: revoked, expired, or idle too long."""
        ended = doomed(sessions.c.digest, sessions.c.revoked.is_(True) | (sessions.c.expires_at <= now)
                       | (sessions.c.last_seen < now - self.idle_ttl), batch=batch)
        async with self.engine.begin() as conn:
            return (await conn.execute(delete(sessions).where(sessions.c.digest.in_(ended)))).rowcount

    async def end_all(self, subject: str, *, but: str | None = None) -> None:
        """End every session of a subject (but the one with sid `but`, when given)."""
        condition = sessions.c.subject == subject
        if but is not None:
            condition &= sessions.c.sid != but
        async with self.engine.begin() as conn:
            await conn.execute(update(sessions).where(condition).values(revoked=True))
