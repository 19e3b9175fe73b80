"""An in-process cache of live access-token rows for the hot path (introspection, phantom forward-auth).

What is cached: the stored row of a token that was found live (known, not revoked, not expired), keyed by
the token's SHA-256 digest, with what the hot path derives from it (the RFC 7662 JSON, built once).
Unknown and revoked tokens are never cached: garbage cannot evict good entries, and an unknown token still
costs one indexed lookup.

How long: an entry is served until `min(token exp, fill time + seconds)`. `seconds` (setting
`introspection_cache_seconds`, default 5) is the staleness bound should a revocation notice ever be lost;
the size is bounded too (least recently used entries go first).

Revocation is immediate all the same:

- The process that revokes evicts locally once its transaction is over (`TokenStore`), and on PostgreSQL
  sends `pg_notify('iam_token_revoked', ...)` inside the revoking transaction, so every listener hears of it
  when (and only if) it commits. Payloads: `d:<hex digest>`, `g:<grant id>`, `s:<subject>`.
- Every token-role process listens on a dedicated asyncpg connection (`RevocationListener`, not the
  SQLAlchemy pool) and evicts on each notice. While that connection is not up (start-up, loss, reconnect
  with backoff) the cache is bypassed, every request goes to the store, and the cache is emptied on every
  (re)connect. A dead connection is noticed when it closes (a termination listener) or when a periodic
  `SELECT 1` on it fails or times out.
- On SQLite (one process by construction) local eviction is enough: the cache is always on.
- The same channel and connection carry stored-client changes (`c:<client_id>`, iam/token/stored_clients.py):
  those go to the listener's `clients` callback, never to the cache; the listener therefore runs on PostgreSQL
  even with the cache off.

A fill races with a concurrent revocation (read the row, the revocation commits and evicts, then the stale
row would be put): every eviction bumps `generation`, and a fill is kept only if no eviction happened since
its read began.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Generic, Protocol, TypeVar

from iam.tasks import cancel

log = logging.getLogger("iam.token.hot_cache")

CHANNEL = "iam_token_revoked"
DEFAULT_SECONDS = 5
DEFAULT_MAX_ENTRIES = 100_000


class Entry(Protocol):
    """What the cache holds: a live token's row and the instant (epoch seconds) it may be served until."""

    row: Any  # AccessTokenRow
    until: float


# -- notification payloads -------------------------------------------------------------------------------
def digest_payload(digest: bytes) -> str:
    return "d:" + digest.hex()


def grant_payload(grant_id: str) -> str:
    return "g:" + grant_id


def subject_payload(subject: str) -> str:
    return "s:" + subject


def client_payload(client_id: str) -> str:
    """A stored client was created, changed or deleted (iam/token/stored_clients.py): reload it."""
    return "c:" + client_id


E = TypeVar("E", bound=Entry)


class HotCache(Generic[E]):
    """digest -> live entry, LRU-bounded, with grant and subject indexes for bulk eviction.

    Not thread-safe: it belongs to one event loop (one process), like the rest of the app.
    """

    def __init__(self, seconds: float = DEFAULT_SECONDS, max_entries: int = DEFAULT_MAX_ENTRIES, *,
                 enabled: bool = True) -> None:
        self.seconds = seconds
        self.max_entries = max_entries
        # Off while revocation notices cannot reach this process (PostgreSQL, listener down): then every
        # lookup goes to the store. Always on for SQLite. Never on when seconds is 0.
        self._enabled = enabled and seconds > 0
        self.generation = 0  # bumped by every eviction: a fill that began before it is not kept
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, E] = OrderedDict()
        self._by_grant: dict[str, set[bytes]] = {}
        self._by_subject: dict[str, set[bytes]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, digest: bytes) -> bool:
        return digest in self._entries

    # -- state -------------------------------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self._enabled

    def enable(self) -> None:
        """Serve from the cache again, starting empty (notices may have been missed while it was off)."""
        self.clear()
        self._enabled = self.seconds > 0

    def disable(self) -> None:
        """Bypass the cache: every lookup goes to the store, and nothing is kept."""
        self._enabled = False
        self.clear()

    # -- the hot path ------------------------------------------------------------------------------------
    def get(self, digest: bytes, now: float) -> E | None:
        if not self._enabled:
            return None
        entry = self._entries.get(digest)
        if entry is None:
            self.misses += 1
            return None
        if now >= entry.until:  # its bound, or the token's own expiry, has passed
            self._drop(digest)
            self.misses += 1
            return None
        self._entries.move_to_end(digest)
        self.hits += 1
        return entry

    def until(self, expires_at: int, now: float) -> float:
        """How long a row read at `now` may be served: never past the token's expiry."""
        return min(expires_at, now + self.seconds)

    def put(self, digest: bytes, entry: E, generation: int, now: float | None = None) -> bool:
        """Keep a live entry, unless an eviction happened since `generation` was read (before the lookup)."""
        if not self._enabled or generation != self.generation:
            return False
        if now is not None:
            self.sweep(now, limit=2)  # amortised: expired entries do not pile up until the size bound
        if digest in self._entries:
            self._drop(digest)
        self._entries[digest] = entry
        row = entry.row
        if row.grant_id is not None:
            self._by_grant.setdefault(row.grant_id, set()).add(digest)
        self._by_subject.setdefault(row.subject, set()).add(digest)
        while len(self._entries) > self.max_entries:
            self._drop(next(iter(self._entries)))  # the least recently used
        return True

    # -- eviction ----------------------------------------------------------------------------------------
    def evict_digest(self, digest: bytes) -> None:
        self.generation += 1
        if digest in self._entries:
            self._drop(digest)

    def evict_grant(self, grant_id: str) -> None:
        self.generation += 1
        for digest in list(self._by_grant.get(grant_id, ())):
            self._drop(digest)

    def evict_subject(self, subject: str) -> None:
        self.generation += 1
        for digest in list(self._by_subject.get(subject, ())):
            self._drop(digest)

    def clear(self) -> None:
        self.generation += 1
        self._entries.clear()
        self._by_grant.clear()
        self._by_subject.clear()

    def apply(self, payload: str) -> None:
        """Evict what a revocation notice names; anything unreadable empties the whole cache (fail safe)."""
        kind, _, key = payload.partition(":")
        if kind == "d":
            try:
                self.evict_digest(bytes.fromhex(key))
                return
            except ValueError:
                pass
        elif kind == "g" and key:
            self.evict_grant(key)
            return
        elif kind == "s" and key:
            self.evict_subject(key)
            return
        log.warning("unreadable revocation notice (kind %r): cache cleared", kind[:8])
        self.clear()

    def sweep(self, now: float, limit: int | None = None) -> int:
        """Drop expired entries from the least recently used end, stopping at the first live one (or `limit`).

        Only frees memory early: an expired entry is never served anyway, and the size bound holds regardless.
        """
        dropped = 0
        while self._entries and (limit is None or dropped < limit):
            digest, entry = next(iter(self._entries.items()))
            if now < entry.until:
                break
            self._drop(digest)
            dropped += 1
        return dropped

    def _drop(self, digest: bytes) -> None:
        entry = self._entries.pop(digest)
        row = entry.row
        for index, key in ((self._by_grant, row.grant_id), (self._by_subject, row.subject)):
            if key is None:
                continue
            digests = index.get(key)
            if digests is not None:
                digests.discard(digest)
                if not digests:
                    del index[key]


class RevocationListener:
    """LISTEN iam_token_revoked on a dedicated asyncpg connection; the cache is on only while it is up."""

    PING_INTERVAL = 2.0  # seconds between liveness checks of the listening connection
    PING_TIMEOUT = 2.0
    BACKOFF_MIN = 0.1
    BACKOFF_MAX = 5.0
    APPLICATION_NAME = "iam token revocation listener"

    def __init__(self, cache: HotCache[Any], connect: Callable[[], Awaitable[Any]],
                 clients: Callable[[str], None] | None = None,
                 resync: Callable[[], Awaitable[None]] | None = None) -> None:
        """`connect` opens a new asyncpg connection to the token store (see `Store.connect_driver`); `clients` is
        told of each client change notice (its client_id); `resync` runs at every (re)connect, before the listener
        counts as connected: whatever changed while nobody listened is read again."""
        self.cache = cache
        self._connect = connect
        self._clients = clients
        self._resync = resync
        self._task: asyncio.Task[None] | None = None
        self._connection = None
        self._was_up = False
        self.connected = asyncio.Event()
        self.connections = 0  # how many times it has (re)connected

    @property
    def pid(self) -> int | None:
        """The PostgreSQL backend pid of the listening connection, while it is up."""
        connection = self._connection
        return connection.get_server_pid() if connection is not None and not connection.is_closed() else None

    def start(self) -> None:
        if self._task is None:
            self.cache.disable()
            self._task = asyncio.create_task(self._run(), name="iam-revocation-listener")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel(task)
        self.cache.disable()

    async def wait_connected(self, timeout: float) -> None:
        await asyncio.wait_for(self.connected.wait(), timeout)

    async def _run(self) -> None:
        backoff = self.BACKOFF_MIN
        while True:
            self._was_up = False
            try:
                await self._listen()  # returns only by raising
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure means "not listening": bypass and retry
                if self._was_up:
                    backoff = self.BACKOFF_MIN  # it was up: reconnect promptly
                log.warning("revocation listener down (%s: %s); introspection bypasses the cache, retrying "
                            "in %.1f s", exc.__class__.__name__, exc, backoff)
            finally:
                self._down()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.BACKOFF_MAX)

    async def _listen(self) -> None:
        connection = await self._connect()
        self._connection = connection
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _conn: lost.set())
        await connection.add_listener(CHANNEL, self._notified)
        # Listening from here on: whatever was revoked before is in the store, so start empty.
        if self._resync is not None:
            await self._resync()
        self.cache.enable()
        self._was_up = True
        self.connections += 1
        self.connected.set()
        if self.connections > 1:
            log.info("revocation listener reconnected; introspection cache on again")
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for returns the result of an awaitable that completes
        # just as the task is cancelled, and the cancellation is lost: stop() would then wait for ever.
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.PING_INTERVAL):
                    await lost.wait()
            if lost.is_set() or connection.is_closed():
                raise ConnectionError("the listening connection was closed")
            async with asyncio.timeout(self.PING_TIMEOUT):
                await connection.fetchval("SELECT 1")

    def _notified(self, _connection: object, _pid: int, _channel: str, payload: str) -> None:
        if payload.startswith("c:") and self._clients is not None:
            self._clients(payload[2:])
            return
        self.cache.apply(payload)

    def _down(self) -> None:
        self.cache.disable()  # first: no request may be served from the cache without the listener
        self.connected.clear()
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            connection.terminate()
