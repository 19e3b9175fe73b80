"""Login throttling per account and per client address (ASVS 5 V6.3.1), without unbounded lockout.

An account is locked for a few minutes after a burst of failures, an address for longer after many.
Both keys are counted whether or not the account exists, so the answer never tells which.
"""

from __future__ import annotations

import time

from sqlalchemy import delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from iam.authn.store import login_failures

WINDOW = 15 * 60
# key prefix -> (failures allowed in a window, lock seconds once exceeded)
LIMITS = {"user": (5, 5 * 60), "addr": (30, 15 * 60)}


class Throttle:
    def __init__(self, engine: AsyncEngine, clock=time.time) -> None:
        self.engine = engine
        self.clock = clock

    async def locked_for(self, keys: list[str]) -> int:
        """Seconds until every key may try again (0: not locked)."""
        now = int(self.clock())
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(login_failures).where(login_failures.c.key.in_(keys)))).all()
        return max([row.locked_until - now for row in rows if row.locked_until > now], default=0)

    async def fail(self, keys: list[str]) -> None:
        now = int(self.clock())
        async with self.engine.begin() as conn:
            for key in keys:
                allowed, lock = LIMITS[key.split(":", 1)[0]]
                row = (await conn.execute(select(login_failures).where(login_failures.c.key == key))).first()
                if row is None or now - row.window_start > WINDOW:
                    failures, start = 1, now
                else:
                    failures, start = row.failures + 1, row.window_start
                locked_until = now + lock if failures >= allowed else 0
                if locked_until:
                    failures, start = 0, now  # the lock is the penalty; counting starts afresh after it
                dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
                values = {"failures": failures, "window_start": start, "locked_until": locked_until}
                await conn.execute(
                    dialect.insert(login_failures).values(key=key, **values)
                    .on_conflict_do_update(index_elements=[login_failures.c.key], set_=values)
                )

    async def clear(self, key: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(delete(login_failures).where(login_failures.c.key == key))

    async def purge_stale(self, now: int, batch: int) -> int:
        """Delete at most `batch` counters that neither lock nor count any more (their window is over)."""
        stale = (
            select(login_failures.c.key)
            .where(login_failures.c.locked_until < now, login_failures.c.window_start < now - WINDOW)
            .limit(batch)
        )
        async with self.engine.begin() as conn:
            return (await conn.execute(delete(login_failures).where(login_failures.c.key.in_(stale)))).rowcount
