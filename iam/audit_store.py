"""Audit events kept in the stores as well (`audit_store: true`), for queries (`iam audit list`) and retention.

The audit log stream stays the primary record. With the option on, a logging handler queues each event in
memory and the runtime writes the queue in batches (every maintenance tick, and at shutdown), so a request
never waits on it. Each event goes to the store of the role it belongs to (sign-ins to the credential store,
tokens to the token store, users to the user store), or to the process's own store when that role runs
elsewhere. While a store is down the events wait; past `capacity` the oldest are dropped and counted in
`iam_audit_dropped_total`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque

from sqlalchemy import BigInteger, Column, Integer, MetaData, String, Table, Text, delete, insert, select

from iam.observability import AUDIT_DROPPED
from iam.store import _reason, doomed

log = logging.getLogger("iam.audit_store")

# The store each event belongs in, by the event's first word.
OWNER = {
    "login": "authn", "mfa": "authn", "session": "authn", "password": "authn", "consent": "authn",
    "reauthentication": "authn",
    "token": "token", "refresh": "token", "code": "token", "client": "token", "device": "token", "access": "token",
    "user": "users",
}


def audit_table(metadata: MetaData) -> Table:
    """The same `audit_events` table in every store (each tree has its own migration for it)."""
    return Table(
        "audit_events",
        metadata,
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("at", BigInteger, nullable=False, index=True),  # epoch milliseconds
        Column("event", String(64), nullable=False, index=True),
        Column("outcome", String(16), nullable=False),
        Column("actor", String(255), index=True),
        Column("client_id", String(128)),
        Column("source", String(64)),
        Column("details", Text, nullable=False),  # JSON object
    )


# The same table, for the statements here: a statement names its table, not the role's metadata it belongs to.
_AUDIT_EVENTS = audit_table(MetaData())


class AuditSink(logging.Handler):
    """Queues audit records for the stores; `flush` writes them. Safe to emit from any thread."""

    def __init__(self, stores: dict, capacity: int = 10_000) -> None:
        super().__init__(logging.INFO)
        self.stores = stores  # store name -> iam.store.Store, the ones this process owns
        self.capacity = capacity
        self.queue: deque[dict] = deque()
        self._lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "audit", None)
        if not isinstance(event, dict):
            return
        row = {
            "at": int(record.created * 1000), "event": event["event"], "outcome": event["outcome"],
            "actor": _text(event.get("actor"), 255), "client_id": _text(event.get("client_id"), 128),
            "source": _text(event.get("source"), 64),
            "details": json.dumps(event.get("details") or {}, default=str, separators=(",", ":")),
        }
        with self._lock:
            self.queue.append(row)
            if len(self.queue) > self.capacity:
                self.queue.popleft()
                AUDIT_DROPPED.inc()

    def store_for(self, event: str) -> str:
        owner = OWNER.get(event.split(".", 1)[0])
        return owner if owner is not None and owner in self.stores else next(iter(self.stores))

    # Not logging.Handler's flush (whose stream is the queue here): the runtime awaits this one.
    async def flush(self) -> int:  # type: ignore[override]
        """Write what is queued, one transaction per store; what a store refused goes back to the queue."""
        with self._lock:
            rows, self.queue = list(self.queue), deque()
        if not rows:
            return 0
        by_store: dict[str, list[dict]] = {}
        for row in rows:
            by_store.setdefault(self.store_for(row["event"]), []).append(row)
        written = 0
        for name, batch in by_store.items():
            store = self.stores[name]
            try:
                async with store.engine.begin() as conn:
                    await conn.execute(insert(_AUDIT_EVENTS), batch)
                written += len(batch)
            except Exception as exc:
                log.warning("audit events not written to the %s store yet (%s); kept for the next try",
                            name, _reason(exc))
                with self._lock:
                    self.queue.extendleft(reversed(batch))
                    while len(self.queue) > self.capacity:
                        self.queue.popleft()
                        AUDIT_DROPPED.inc()
        return written


def _text(value, limit: int) -> str | None:
    return None if value is None else str(value)[:limit]


async def purge_before(store, cutoff_ms: int, batch: int) -> int:
    """Delete at most `batch` audit events older than the retention from one store."""
    table = _AUDIT_EVENTS
    old = doomed(table.c.id, table.c.at < cutoff_ms, batch=batch)
    async with store.engine.begin() as conn:
        return (await conn.execute(delete(table).where(table.c.id.in_(old)))).rowcount


async def recent(store, *, event: str | None = None, actor: str | None = None, since_ms: int = 0,
                 limit: int = 100) -> list[dict]:
    """The newest events of one store, newest first."""
    table = _AUDIT_EVENTS
    query = select(table).where(table.c.at >= since_ms).order_by(table.c.at.desc(), table.c.id.desc()).limit(limit)
    if event:
        query = query.where(table.c.event == event)
    if actor:
        query = query.where(table.c.actor == actor)
    async with store.engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [{"at": row.at, "event": row.event, "outcome": row.outcome, "actor": row.actor,
             "client_id": row.client_id, "source": row.source, "details": json.loads(row.details)} for row in rows]
