"""A role's store: one database URL, one async engine, one alembic migration tree (`migrations/<name>/`,
sharing `migrations/env.py`).

No role opens another role's store; roles talk over their APIs.

Rolling upgrades (expand/contract): a revision module may declare `compatible_with`, the earlier heads whose
code keeps working with the schema it produces (an expansion the older code ignores; a contraction of what
the older code no longer uses). `iam migrate` records the head's declaration in the store itself
(`schema_compatibility`), because the older code running next to it does not have the newer revision file.
An instance is ready when its store is at its own head, or at a later revision declared compatible with it.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Column, MetaData, Select, String, Table, Text, delete, event, insert, inspect, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

log = logging.getLogger("iam.store")

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"
MIGRATION_LOCK_TIMEOUT_MS = 2000


# Written by `iam migrate`: which earlier heads' code the schema at `revision` serves (comma-separated).
schema_compatibility = Table(
    "schema_compatibility",
    MetaData(),
    Column("revision", String(64), primary_key=True),
    Column("compatible_with", Text, nullable=False),
)


class StoreError(Exception):
    """The store cannot be used: its schema is not the one this code needs."""


class StoreUnreachable(StoreError):
    """The store does not answer."""


def alembic_config(name: str, metadata: MetaData | None = None) -> Config:
    """The alembic configuration of one store's tree; `metadata` is its role's tables (the role's store module
    owns them: this module never imports a role)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("path_separator", "os")
    config.set_main_option("version_locations", str(MIGRATIONS / name))
    config.attributes["metadata"] = metadata
    return config


class Store:
    """`timeout`: the longest a request waits for this store, end to end, before it fails (503).

    On PostgreSQL it is split in three equal parts, one per step a request can wait at: a free pooled
    connection, a new connection, one statement (on the client, and on the server as `statement_timeout` and
    `lock_timeout`, so nothing queues behind a stuck lock). A request stops at its first failing statement
    and nothing retries after a timeout, so the parts add up to at most `timeout`.
    """

    def __init__(self, name: str, url: str, metadata: MetaData | None = None, *, pool_size: int = 20,
                 timeout: float = 3.0) -> None:
        self.name = name
        self.metadata = metadata
        self.url = make_url(url)
        self.timeout = timeout
        self.script = ScriptDirectory.from_config(alembic_config(name))
        self.head = self.script.get_current_head()
        self.known = {script.revision for script in self.script.walk_revisions()}
        if self.url.get_backend_name() == "sqlite":
            database = self.url.database or ""
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: AsyncEngine = create_async_engine(self.url, connect_args={"timeout": 5})
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            step = timeout / 3
            milliseconds = str(max(1, int(step * 1000)))
            self._connect_args = {
                "timeout": step,
                "command_timeout": step,
                "server_settings": {"statement_timeout": milliseconds, "lock_timeout": milliseconds},
                **_no_tls_on_loopback(self.url),
            }
            self.engine = create_async_engine(
                self.url,
                # A fixed pool: overflow connections would be opened and closed under load (connection churn).
                pool_size=pool_size,
                max_overflow=0,
                pool_timeout=step,
                connect_args=self._connect_args,
            )
            event.listen(self.engine.sync_engine, "checkout", _closed_by_server)
            event.listen(self.engine.sync_engine, "handle_error", _timeout_ends_connection)

    @property
    def is_postgresql(self) -> bool:
        return self.url.get_backend_name() == "postgresql"

    async def connect_driver(self, **options: Any) -> Any:
        """A new asyncpg connection to this (PostgreSQL) store, outside the pool: same URL, same options.

        For a long-lived connection of its own, such as the token role's LISTEN connection.
        """
        import asyncpg

        _, kwargs = self.engine.dialect.create_connect_args(self.url)
        for name in ("prepared_statement_cache_size", "prepared_statement_name_func", "async_fallback",
                     "async_creator_fn"):
            kwargs.pop(name, None)  # SQLAlchemy's own options, not asyncpg's
        return await asyncpg.connect(**{**kwargs, **self._connect_args, **options})

    @property
    def describe(self) -> str:
        return self.url.render_as_string(hide_password=True)

    def declared_compatible(self, revision: str | None) -> tuple[str, ...]:
        """The earlier heads a revision of this tree declares compatible with its schema."""
        script = self.script.get_revision(revision) if revision else None
        return tuple(getattr(script.module, "compatible_with", ())) if script else ()

    async def schema(self) -> tuple[str | None, tuple[str, ...]]:
        """The store's revision and, when it is one this code does not know (a later release migrated it),
        the heads that later release declared compatible with it."""

        def read(sync) -> tuple[str | None, tuple[str, ...]]:
            current = MigrationContext.configure(sync).get_current_revision()
            if current is None or current in self.known or not inspect(sync).has_table("schema_compatibility"):
                return current, ()
            declared = sync.execute(select(schema_compatibility.c.compatible_with)
                                    .where(schema_compatibility.c.revision == current)).scalar()
            return current, tuple(filter(None, (declared or "").split(",")))

        async with self.engine.connect() as conn:
            return await conn.run_sync(read)

    async def check(self) -> None:
        """Raise StoreError unless the store answers and its schema serves this code: at this code's head, or
        at a later revision declared compatible with it.

        A connection error is tried once more (a read: always safe to repeat), all within `timeout`: one
        connection lost to a database restart does not make the instance not-ready.
        """
        try:
            async with asyncio.timeout(self.timeout):
                try:
                    current, compatible = await self.schema()
                except Exception as exc:
                    if not _is_connection_error(exc) or isinstance(exc, TimeoutError):
                        raise
                    log.info("%s store: %s; trying once more", self.name, _reason(exc))
                    current, compatible = await self.schema()
        except Exception as exc:  # any failure to answer means "not ready"
            raise self._unreachable(exc) from None
        if current == self.head or self.head in compatible:
            return
        if current is None or current in self.known:
            raise StoreError(
                f"{self.name} store schema is at {current or 'nothing'}, this code needs {self.head}: run `iam migrate`"
            )
        raise StoreError(f"{self.name} store schema is at {current}, a later revision not declared compatible with "
                         f"this code's {self.head}: upgrade this instance")

    async def plan(self) -> tuple[str | None, list[str], bool]:
        """What `iam migrate` would do: (current revision, revisions it would apply in order, whether code at the
        current revision stays compatible with the schema afterwards)."""
        current, compatible = await self.schema()
        if current is not None and current not in self.known:  # migrated by a later release already
            return current, [], self.head in compatible
        pending = [script.revision for script in self.script.iterate_revisions(self.head, current or "base")]
        pending.reverse()
        stays = current is None or current == self.head or current in self.declared_compatible(self.head)
        return current, pending, stays

    async def migrate(self) -> None:
        def upgrade(sync_conn) -> None:
            config = alembic_config(self.name, self.metadata)
            config.attributes["connection"] = sync_conn
            command.upgrade(config, "head")
            # For the older code still running against this store: which heads this schema serves.
            schema_compatibility.create(sync_conn, checkfirst=True)
            sync_conn.execute(delete(schema_compatibility).where(schema_compatibility.c.revision == self.head))
            sync_conn.execute(insert(schema_compatibility).values(
                revision=self.head, compatible_with=",".join(self.declared_compatible(self.head))))

        # A migration may run longer than a request may wait, but must never hold up requests behind a lock
        # it waits for: no statement timeout, a short lock timeout (the Job is retried).
        engine = self.engine if not self.is_postgresql else create_async_engine(
            self.url, poolclass=NullPool, connect_args={
                **self._connect_args, "command_timeout": None,
                "server_settings": {"statement_timeout": "0", "lock_timeout": str(MIGRATION_LOCK_TIMEOUT_MS)},
            })
        try:
            # Alembic opens the migration's transaction itself (so a revision can step out of it, for
            # CREATE INDEX CONCURRENTLY); the compatibility record is committed after it.
            async with engine.connect() as conn:
                await conn.run_sync(upgrade)
                await conn.commit()
        except (OSError, TimeoutError, DBAPIError) as exc:
            raise self._unreachable(exc) if _is_connection_error(exc) else StoreError(
                f"{self.name} store migration failed ({_reason(exc)})"
            ) from None
        finally:
            if engine is not self.engine:
                await engine.dispose()
        log.info("%s store migrated to %s", self.name, self.head)

    def _unreachable(self, exc: BaseException) -> StoreUnreachable:
        return StoreUnreachable(f"{self.name} store at {self.describe} is unreachable ({_reason(exc)})")

    async def close(self) -> None:
        await self.engine.dispose()


def doomed(key, *conditions, batch: int) -> Select:
    """The keys of at most `batch` rows to purge, for `DELETE ... WHERE key IN (...)`.

    On PostgreSQL rows another transaction holds locked (a request, another replica's purge) are skipped
    (`FOR UPDATE SKIP LOCKED`): a purge never waits on the hot path, and replicas purging at once share the
    work instead of queueing behind each other.
    """
    return select(key).where(*conditions).limit(batch).with_for_update(skip_locked=True)


async def purge_until_done(steps: Iterable[Callable[[], Awaitable[int]]], batch: int, budget: float) -> int:
    """Run each purge step (one bounded batch, returning how many rows it deleted) until it deletes less than
    a full batch, or until `budget` seconds have passed: a backlog is worked off at the database's own pace,
    yet one purge round never runs unbounded."""
    deadline = time.monotonic() + budget
    total = 0
    for step in steps:
        while True:
            deleted = await step()
            total += deleted
            if deleted < batch or time.monotonic() >= deadline:
                break
    return total


def _no_tls_on_loopback(url) -> dict:
    # asyncpg tries TLS first by default; on a loopback or socket connection that is a wasted round trip.
    if url.query.get("ssl") or url.query.get("sslmode"):
        return {}
    return {"ssl": False} if url.host in ("127.0.0.1", "localhost", "::1", None) else {}


def _sqlite_pragmas(dbapi_conn, _record=None, busy_ms: int = 5000) -> None:
    # WAL lets readers proceed during a write; busy_timeout turns lock contention into a short wait. In WAL,
    # synchronous=NORMAL syncs at checkpoints instead of at every commit: a commit survives the process
    # crashing, and the database stays consistent on power loss (the last commits may be lost then).
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


class SqliteDirect:
    """The hot statements of a SQLite file store without aiosqlite's thread hop per statement.

    Reads run on the event loop, on a connection of their own: in WAL a reader never waits for a writer, and
    a one-row indexed lookup costs less than the hop. Should the database be busy anyway (a checkpoint
    resetting the WAL), the read raises sqlite3.Error at once (no busy wait on the loop) and the caller falls
    back to its usual path. Writes go to one writer thread that commits whatever has queued meanwhile in one
    transaction (group commit): each caller's future resolves only after that COMMIT, and a batch that fails
    is rolled back and retried one statement per transaction, so each caller gets its own statement's outcome.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None  # used only in the writer thread
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._queue: list[tuple[str, tuple[Any, ...], asyncio.Future[None]]] = []
        self._flushing: asyncio.Task[None] | None = None

    def _connect(self, busy_ms: int) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        _sqlite_pragmas(conn, busy_ms=busy_ms)
        return conn

    @property
    def reader(self) -> sqlite3.Connection:
        if self._reader is None:
            self._reader = self._connect(busy_ms=0)
        return self._reader

    def read_one(self, sql: str, params: tuple[Any, ...]) -> Any:
        """The first row of a read, or None (sqlite3.Error: see above)."""
        return self.reader.execute(sql, params).fetchone()

    async def write(self, sql: str, params: tuple[Any, ...]) -> None:
        """Run one statement and return once it is committed (sqlite3.Error if it failed: nothing stored)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.append((sql, params, done))
        if self._flushing is None:
            self._flushing = loop.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                try:
                    outcomes = await loop.run_in_executor(self._thread, self._commit, [(s, p) for s, p, _ in batch])
                except Exception as exc:  # the whole batch failed (or the writer thread is shut down)
                    outcomes = [exc] * len(batch)
                for (_, _, done), outcome in zip(batch, outcomes, strict=True):
                    if done.done():
                        continue
                    if outcome is None:
                        done.set_result(None)
                    else:
                        done.set_exception(outcome)
        finally:
            self._flushing = None

    def _commit(self, batch: list[tuple[str, tuple[Any, ...]]]) -> list[Exception | None]:
        """In the writer thread: the batch in one transaction, or else each statement in its own."""
        if self._writer is None:
            self._writer = self._connect(busy_ms=5000)
        conn = self._writer
        try:
            conn.execute("BEGIN IMMEDIATE")
            for sql, params in batch:
                conn.execute(sql, params)
            conn.execute("COMMIT")
            return [None] * len(batch)
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if len(batch) == 1:
                raise
        outcomes: list[Exception | None] = []
        for sql, params in batch:
            try:
                conn.execute(sql, params)  # autocommit: its own transaction
                outcomes.append(None)
            except sqlite3.Error as exc:
                outcomes.append(exc)
        return outcomes

    async def close(self) -> None:
        """After the last request: what is queued is committed first."""
        if self._flushing is not None:
            await self._flushing
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        writer, self._writer = self._writer, None
        if writer is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, writer.close)
        self._thread.shutdown(wait=True)


def _closed_by_server(_dbapi_conn, record, _proxy) -> None:
    # A pooled connection the server has closed (a restart, a failover, an idle timeout) is replaced at
    # checkout, before any statement is sent on it: no round trip, unlike a pre-ping.
    if record.driver_connection.is_closed():
        raise DisconnectionError("the server closed this pooled connection")


def _timeout_ends_connection(context) -> None:
    # After a client-side timeout the connection is in an unknown state (a cancel pending on a server that
    # may not answer): drop it instead of resetting it, which would wait on the server again.
    if isinstance(context.original_exception, TimeoutError):
        context.is_disconnect = True


def _is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError | TimeoutError) or bool(getattr(exc, "connection_invalidated", False)) or (
        isinstance(exc, DBAPIError) and isinstance(exc.orig, OSError | TimeoutError)
    )


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0]}" if text and text[0] else exc.__class__.__name__
