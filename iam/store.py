"""A role's store: one database URL, one async engine, one alembic migration tree (`migrations/<name>/`,
sharing `migrations/env.py`).

No role opens another role's store; roles talk over their APIs.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import MetaData, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

log = logging.getLogger("iam.store")

MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


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
    def __init__(self, name: str, url: str, metadata: MetaData | None = None, *, pool_size: int = 20) -> None:
        self.name = name
        self.metadata = metadata
        self.url = make_url(url)
        self.head = ScriptDirectory.from_config(alembic_config(name)).get_current_head()
        if self.url.get_backend_name() == "sqlite":
            database = self.url.database or ""
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
            self.engine: AsyncEngine = create_async_engine(self.url, connect_args={"timeout": 5})
            event.listen(self.engine.sync_engine, "connect", _sqlite_pragmas)
        else:
            self._connect_args = {"timeout": 5, "command_timeout": 10, **_no_tls_on_loopback(self.url)}
            self.engine = create_async_engine(
                self.url,
                # A fixed pool: overflow connections would be opened and closed under load (connection churn).
                pool_size=pool_size,
                max_overflow=0,
                pool_timeout=5,
                connect_args=self._connect_args,
            )

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

    async def revision(self) -> str | None:
        async with self.engine.connect() as conn:
            return await conn.run_sync(lambda sync: MigrationContext.configure(sync).get_current_revision())

    async def check(self) -> None:
        """Raise StoreError unless the store answers and its schema is at this code's head revision."""
        try:
            current = await asyncio.wait_for(self.revision(), timeout=5)
        except Exception as exc:  # any failure to answer means "not ready"
            raise self._unreachable(exc) from None
        if current != self.head:
            raise StoreError(
                f"{self.name} store schema is at {current or 'nothing'}, this code needs {self.head}: run `iam migrate`"
            )

    async def migrate(self) -> None:
        def upgrade(sync_conn) -> None:
            config = alembic_config(self.name, self.metadata)
            config.attributes["connection"] = sync_conn
            command.upgrade(config, "head")

        try:
            async with self.engine.begin() as conn:
                await conn.run_sync(upgrade)
        except (OSError, TimeoutError, DBAPIError) as exc:
            raise self._unreachable(exc) if _is_connection_error(exc) else StoreError(
                f"{self.name} store migration failed ({_reason(exc)})"
            ) from None
        log.info("%s store migrated to %s", self.name, self.head)

    def _unreachable(self, exc: BaseException) -> StoreUnreachable:
        return StoreUnreachable(f"{self.name} store at {self.describe} is unreachable ({_reason(exc)})")

    async def close(self) -> None:
        await self.engine.dispose()


def _no_tls_on_loopback(url) -> dict:
    # asyncpg tries TLS first by default; on a loopback or socket connection that is a wasted round trip.
    if url.query.get("ssl") or url.query.get("sslmode"):
        return {}
    return {"ssl": False} if url.host in ("127.0.0.1", "localhost", "::1", None) else {}


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # WAL lets readers proceed during a write; busy_timeout turns lock contention into a short wait.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError | TimeoutError) or bool(getattr(exc, "connection_invalidated", False)) or (
        isinstance(exc, DBAPIError) and isinstance(exc.orig, OSError | TimeoutError)
    )


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0]}" if text and text[0] else exc.__class__.__name__
