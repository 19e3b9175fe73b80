"""The token store: opaque tokens are kept only as SHA-256 digests, next to the JWT signed at issuance."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    Boolean,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.engine import Row
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from iam.audit_store import audit_table
from iam.observability import STORE_DURATION, store_span
from iam.store import SqliteDirect, doomed
from iam.token.holders import Holder
from iam.token.hot_cache import CHANNEL, HotCache, client_payload, digest_payload, grant_payload, subject_payload

log = logging.getLogger("iam.token.store")

metadata = MetaData()
audit_events = audit_table(metadata)  # with `audit_store: true` (iam/audit_store.py)

CODE_REPLAY_MEMORY = 3600  # seconds a spent code is remembered after it expired

access_tokens = Table(
    "access_tokens",
    metadata,
    Column("digest", LargeBinary(32), primary_key=True),  # SHA-256 of the opaque token
    Column("client_id", String(128), nullable=False, index=True),
    Column("subject", String(255), nullable=False),
    Column("expires_at", Integer, nullable=False, index=True),  # epoch seconds
    Column("revoked", Boolean, nullable=False, default=False),
    Column("jwt", Text, nullable=False),  # the RFC 9068 JWT paired with the opaque token
    Column("grant_id", String(64), index=True),  # the user grant it came from; none for client_credentials
)

# What a user granted a client in one authorization: codes, refresh and access tokens hang off it, and
# revoking it (code replay, refresh-token reuse, logout) revokes all of them together.
grants = Table(
    "grants",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("client_id", String(128), nullable=False),
    Column("subject", String(255), nullable=False, index=True),
    Column("scope", Text, nullable=False),
    Column("sid", String(64), index=True),  # the SSO session it was granted in
    Column("auth_time", Integer, nullable=False),
    Column("amr", String(255), nullable=False),
    Column("acr", String(255)),
    Column("connector", String(64)),  # the connector the person signed in through (refresh re-checks ldap ones)
    Column("nonce", Text),
    Column("offline", Boolean, nullable=False, default=False),
    Column("created_at", Integer, nullable=False),
    Column("expires_at", Integer, nullable=False, index=True),  # absolute end of the grant
    Column("revoked", Boolean, nullable=False, default=False),
    # The JWK thumbprint of the DPoP key its code and a public client's refresh tokens are bound to (RFC 9449).
    Column("dpop_jkt", String(64)),
    # The x5t#S256 of the TLS client certificate a public client's refresh tokens are bound to (RFC 8705 §4).
    Column("cnf_x5t", String(64)),
    Index("ix_grants_subject_client_id", "subject", "client_id"),  # a person's grants to one client
)

# A pending authorization request, waiting for the authentication role to hand the user back.
authorization_requests = Table(
    "authorization_requests",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("client_id", String(128), nullable=False),
    Column("redirect_uri", Text, nullable=False),
    Column("scope", Text, nullable=False),
    Column("state", Text),
    Column("nonce", Text),
    Column("code_challenge", String(128)),
    Column("prompt", String(64)),
    Column("max_age", Integer),
    Column("subject_hint", String(255)),  # the `sub` of a valid id_token_hint
    Column("acr_values", String(64)),  # the known acr_values asked for, in order of preference
    Column("dpop_jkt", String(64)),  # RFC 9449 §10: the DPoP key the code is bound to
    Column("created_at", Integer, nullable=False),
    Column("expires_at", Integer, nullable=False, index=True),
)

codes = Table(
    "codes",
    metadata,
    Column("digest", LargeBinary(32), primary_key=True),
    Column("grant_id", String(64), nullable=False),
    Column("redirect_uri", Text, nullable=False),
    Column("code_challenge", String(128)),
    Column("expires_at", Integer, nullable=False, index=True),
    Column("consumed", Boolean, nullable=False, default=False),
)

refresh_tokens = Table(
    "refresh_tokens",
    metadata,
    Column("digest", LargeBinary(32), primary_key=True),
    Column("grant_id", String(64), nullable=False, index=True),
    Column("issued_at", Integer, nullable=False),
    Column("expires_at", Integer, nullable=False, index=True),  # idle expiry; the grant has the absolute one
    Column("used_at", Integer),  # set when rotated: a second use is reuse
    Column("revoked", Boolean, nullable=False, default=False),
    # With a reuse window, the successor response, encrypted under a key derived from this token itself.
    Column("successor", LargeBinary),
)


# The device authorization grant (RFC 8628): a device polls with device_code while a person approves the
# user_code in a browser.
device_codes = Table(
    "device_codes",
    metadata,
    Column("digest", LargeBinary(32), primary_key=True),  # SHA-256 of the device_code
    Column("user_code", LargeBinary(32), nullable=False, unique=True),  # SHA-256 of the normalised user code
    Column("client_id", String(128), nullable=False),
    Column("scope", Text, nullable=False),
    Column("interval", Integer, nullable=False),
    Column("last_poll", Integer, nullable=False),
    Column("status", String(16), nullable=False),  # pending | approved | denied | consumed
    Column("grant_id", String(64)),
    Column("expires_at", Integer, nullable=False, index=True),
)

# The `jti`s of client assertions already used (RFC 7523 §3 item 7): a replay, on any replica, hits the primary
# key. Kept until the assertion expires; `digest` is SHA-256 over the client id and the jti.
assertion_jtis = Table(
    "assertion_jtis",
    metadata,
    Column("digest", LargeBinary(32), primary_key=True),
    Column("client_id", String(128), nullable=False),
    Column("expires_at", Integer, nullable=False, index=True),
)


# Clients created through the administration API or the CLI (iam/token/stored_clients.py), beside those of the
# YAML config. Secrets are kept as SHA-256 digests only: the current one, and during a rotation's grace period the
# previous one until `previous_expires_at`.
clients = Table(
    "clients",
    metadata,
    Column("client_id", String(128), primary_key=True),
    Column("metadata", Text, nullable=False),  # RFC 7591 client metadata, JSON, without any secret
    Column("secret_digest", LargeBinary(32)),
    Column("previous_secret_digest", LargeBinary(32)),
    Column("previous_expires_at", Integer),  # epoch seconds: the previous secret works until then
    Column("enabled", Boolean, nullable=False, default=True),
    Column("version", Integer, nullable=False),  # bumped by every change: the ETag
    Column("created_at", Integer, nullable=False),
    Column("updated_at", Integer, nullable=False),
    # A client registered dynamically (RFC 7591, iam/token/registration.py): the SHA-256 digest of its registration
    # access token (RFC 7592), the initial access token it was registered with and that token's policy, as it was.
    Column("registration_digest", LargeBinary(32)),
    Column("initial_token_id", String(32)),
    Column("registration_policy", Text),
    Index("ix_clients_registration_digest", "registration_digest", unique=True),
    Index("ix_clients_initial_token_id_created_at", "initial_token_id", "created_at"),  # the rate limit's count
)

# One row, bumped by every client insert, update and delete in its own transaction: the part of ClientRows.fingerprint
# that no pair of changes can cancel out (delete one client, create another: the same count and sum of versions).
client_changes = Table(
    "client_changes",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("changes", Integer, nullable=False),
)

# Initial access tokens (RFC 7591 §3): who may register a client, under which policy (iam/token/initial_tokens.py).
# Kept as SHA-256 digests; `uses_left` NULL is any number of registrations until `expires_at`.
initial_access_tokens = Table(
    "initial_access_tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("digest", LargeBinary(32), nullable=False, unique=True),
    Column("policy", Text, nullable=False),  # JSON
    Column("uses_left", Integer),
    Column("expires_at", Integer, nullable=False, index=True),
    Column("created_by", String(255), nullable=False),
    Column("created_at", Integer, nullable=False),
)

@dataclass(frozen=True, slots=True)
class AccessTokenRow:
    digest: bytes
    client_id: str
    subject: str
    expires_at: int
    revoked: bool
    jwt: str
    grant_id: str | None = None


@dataclass(frozen=True, slots=True)
class RefreshTokenRow:
    digest: bytes
    grant_id: str
    issued_at: int
    expires_at: int


# Built once: the introspection hot path runs this statement and nothing else. On PostgreSQL it runs as
# _FIND_SQL, straight on the pooled asyncpg connection (prepared once per connection by asyncpg).
_FIND = select(
    access_tokens.c.client_id,
    access_tokens.c.subject,
    access_tokens.c.expires_at,
    access_tokens.c.revoked,
    access_tokens.c.jwt,
    access_tokens.c.grant_id,
).where(access_tokens.c.digest == bindparam("digest"))
_FIND_SQL = (
    "SELECT client_id, subject, expires_at, revoked, jwt, grant_id FROM access_tokens WHERE digest = $1"
)
_FIND_MANY_SQL = (
    "SELECT digest, client_id, subject, expires_at, revoked, jwt, grant_id FROM access_tokens"
    " WHERE digest = ANY($1::bytea[])"
)
_INSERT_ACCESS = insert(access_tokens)
_INSERT_SQL = (
    "INSERT INTO access_tokens (digest, client_id, subject, expires_at, revoked, jwt, grant_id)"
    " VALUES ($1, $2, $3, $4, $5, $6, $7)"
)
_FAILED = object()
# Pooled connections the direct statements (TokenStore._on_driver) keep checked out between statements, of the
# pool's 20: at most this many, so that 12 are always left to the rest of the role; more direct statements at once
# check out from the pool and give back as before.
DIRECT_IDLE = 8
# Token lookups in flight at once (each a batch: iam.token.store.Batches); issuance keeps one INSERT at a time.
LOOKUP_BATCHES = 4
# Concurrent issuances share one INSERT (group commit, see TokenStore.add_access_token): one column array each.
_INSERT_MANY_SQL = (
    "INSERT INTO access_tokens (digest, client_id, subject, expires_at, revoked, jwt, grant_id)"
    " SELECT * FROM unnest($1::bytea[], $2::varchar[], $3::varchar[], $4::integer[], $5::boolean[], $6::text[],"
    " $7::varchar[])"
)
# The same two statements for SQLite's own driver (iam.store.SqliteDirect), with its placeholders.
_FIND_SQLITE = _FIND_SQL.replace("$1", "?")
_INSERT_SQLITE = (
    "INSERT INTO access_tokens (digest, client_id, subject, expires_at, revoked, jwt, grant_id)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)

_GRANT_COLUMNS = [grants.c[name] for name in (
    "client_id", "subject", "scope", "sid", "auth_time", "amr", "acr", "connector", "nonce", "offline", "created_at",
    "dpop_jkt", "cnf_x5t",
)] + [grants.c.expires_at.label("grant_expires_at"), grants.c.revoked.label("grant_revoked")]


def _row(values: Row[*tuple[Any, ...]]) -> dict[str, Any]:
    return dict(values._mapping)


_DIRECT_DURATION = STORE_DURATION.labels("token")

_Item = TypeVar("_Item")
_Result = TypeVar("_Result")


class Batches(Generic[_Item, _Result]):
    """Calls that arrive while `concurrency` batches are being run make the next batch: `run` gets their items at
    once and answers one outcome per item, in order (a result, or the exception that caller gets). A call that
    finds fewer batches running goes at once; under load one statement and one round trip serve many calls, and
    with more than one batch at a time one slow statement does not hold up every call behind it."""

    def __init__(self, run: Callable[[list[_Item]], Awaitable[list[_Result | BaseException]]],
                 concurrency: int = 1) -> None:
        self._run = run
        self._concurrency = concurrency
        self._waiting: list[tuple[_Item, asyncio.Future[_Result]]] = []
        self._running: set[asyncio.Task[None]] = set()

    async def submit(self, item: _Item) -> _Result:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[_Result] = loop.create_future()
        self._waiting.append((item, done))
        if len(self._running) < self._concurrency:
            self._running.add(loop.create_task(self._batches()))
        return await done

    async def close(self) -> None:
        await asyncio.gather(*self._running)

    async def _batches(self) -> None:
        try:
            while self._waiting:
                batch, self._waiting = self._waiting, []
                try:
                    outcomes = await self._run([item for item, _ in batch])
                except Exception as exc:  # nothing may be left waiting
                    outcomes = [exc] * len(batch)
                for (_, done), outcome in zip(batch, outcomes, strict=True):
                    if done.done():
                        continue  # its caller was cancelled meanwhile
                    if isinstance(outcome, BaseException):
                        done.set_exception(outcome)
                    else:
                        done.set_result(outcome)
        finally:
            # At once, not in a done callback: a call that comes before the callback would run must start a batch.
            self._running.discard(asyncio.current_task())


class TokenStore:
    def __init__(self, engine: AsyncEngine, cache: HotCache[Any] | None = None) -> None:
        self.engine = engine
        # Single-statement reads and writes run outside a transaction: no BEGIN/COMMIT round trips.
        self.reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        # The token role's hot cache: every revocation below evicts from it once its transaction is over.
        self.cache = cache
        self._postgresql = engine.dialect.name == "postgresql"
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        self.sqlite = SqliteDirect(database) if database and database != ":memory:" else None
        # PostgreSQL: concurrent issuances share one INSERT and one commit, concurrent lookups one SELECT.
        self._inserts: Batches[AccessTokenRow, None] = Batches(self._insert_batch)
        self._lookups: Batches[bytes, AccessTokenRow | None] = Batches(self._find_batch, LOOKUP_BATCHES)
        self._direct_idle: list[Any] = []  # pooled connections kept checked out by _on_driver between statements
        self._closing = False

    async def close(self) -> None:
        self._closing = True
        await self._inserts.close()
        await self._lookups.close()
        while self._direct_idle:
            self._direct_idle.pop().close()
        if self.sqlite is not None:
            await self.sqlite.close()

    # -- access tokens ------------------------------------------------------------------------------------
    async def add_access_token(self, row: AccessTokenRow) -> None:
        """The lone INSERT of a token issuance, returning once the row is committed.

        On PostgreSQL the issuances that arrive while one batch is being written make the next batch: one
        autocommit INSERT of all their rows, one round trip and one commit (group commit). Should a batch fail,
        each of its rows is inserted on its own, so each caller gets its own row's outcome.
        On SQLite the same, in the writer thread of iam.store.SqliteDirect.
        """
        if self._postgresql:
            await self._inserts.submit(row)
            return
        if self.sqlite is not None:
            started = time.perf_counter()
            try:
                await self.sqlite.write(_INSERT_SQLITE, _access_params(row))
                _DIRECT_DURATION.observe(time.perf_counter() - started)
                return
            except sqlite3.Error as exc:  # rolled back: nothing stored; reported the SQLAlchemy way below
                log.debug("direct insert failed (%s); retrying through SQLAlchemy", exc.__class__.__name__)
        await self._insert(row)

    async def _insert_batch(self, rows: list[AccessTokenRow]) -> list[BaseException | None]:
        async def alone(row: AccessTokenRow) -> None:
            await self._insert_postgresql(row)

        if len(rows) > 1:
            columns = [list(column) for column in zip(*map(_access_params, rows), strict=True)]
            try:
                inserted = await self._on_driver(
                    _INSERT_MANY_SQL, lambda driver: driver.execute(_INSERT_MANY_SQL, *columns))
            except Exception as exc:  # a timeout, no connection: every row of the batch fails alike
                return [exc] * len(rows)
            if inserted is not _FAILED:
                return [None] * len(rows)
        outcomes = await asyncio.gather(*map(alone, rows), return_exceptions=True)
        return [outcome if isinstance(outcome, BaseException) else None for outcome in outcomes]

    async def _insert_postgresql(self, row: AccessTokenRow) -> None:
        """One row in one autocommit round trip, straight on the driver; else the SQLAlchemy way."""
        params = _access_params(row)
        inserted = await self._on_driver(_INSERT_SQL, lambda driver: driver.execute(_INSERT_SQL, *params))
        if inserted is not _FAILED:
            return
        # The direct attempt failed, and may still have committed (a connection lost after COMMIT): insert
        # again the SQLAlchemy way. A duplicate digest can then only be that first attempt's row.
        try:
            await self._insert(row)
        except IntegrityError:
            if await self._find(row.digest) != row:
                raise

    async def _insert(self, row: AccessTokenRow) -> None:
        async with self.reader.connect() as conn:
            await conn.execute(_INSERT_ACCESS, _access_values(row))

    async def find_access_token(self, digest: bytes) -> AccessTokenRow | None:
        """The row of a token by its digest. On PostgreSQL the lookups that arrive while LOOKUP_BATCHES are on their
        way make the next one: a single SELECT for all of them (`Batches`); a lone lookup goes at once, alone."""
        if self._postgresql:
            return await self._lookups.submit(digest)
        if self.sqlite is not None:
            started = time.perf_counter()
            try:
                found = self.sqlite.read_one(_FIND_SQLITE, (digest,))
            except sqlite3.Error:
                pass  # busy (see SqliteDirect): the usual way
            else:
                _DIRECT_DURATION.observe(time.perf_counter() - started)
                if found is None:
                    return None
                client_id, subject, expires_at, revoked, jwt, grant_id = found
                return AccessTokenRow(digest, client_id, subject, expires_at, bool(revoked), jwt, grant_id)
        return await self._find(digest)

    async def _find_batch(self, digests: list[bytes]) -> list[AccessTokenRow | None | BaseException]:
        if len(digests) == 1:
            digest = digests[0]
            found = await self._on_driver(_FIND_SQL, lambda driver: driver.fetchrow(_FIND_SQL, digest))
            if found is not _FAILED:
                return [None if found is None else AccessTokenRow(digest, *found)]
        else:
            unique = list(dict.fromkeys(digests))
            rows = await self._on_driver(_FIND_MANY_SQL, lambda driver: driver.fetch(_FIND_MANY_SQL, unique))
            if rows is not _FAILED:
                by_digest = {bytes(row[0]): AccessTokenRow(bytes(row[0]), *row[1:]) for row in rows}
                return [by_digest.get(digest) for digest in digests]
        # The direct statement failed: each lookup the SQLAlchemy way, which reports store errors as everywhere else.
        outcomes = await asyncio.gather(*map(self._find, digests), return_exceptions=True)
        return list(outcomes)

    async def _find(self, digest: bytes) -> AccessTokenRow | None:
        async with self.reader.connect() as conn:
            found = (await conn.execute(_FIND, {"digest": digest})).first()
        return None if found is None else AccessTokenRow(digest, *found)

    async def _on_driver(self, statement: str, call: Callable[[Any], Awaitable[Any]]) -> Any:
        """Run one statement straight on a pooled asyncpg connection (PostgreSQL), skipping SQLAlchemy's
        per-statement work: the two hot statements (the token lookup, the issuance INSERT) use this.

        An idle pooled connection has no transaction open, so the statement is one autocommit round trip.
        Returns _FAILED if it raised: the connection is then dropped, and the caller runs the statement the
        SQLAlchemy way, which handles (and reports) disconnects and store errors as everywhere else. A timeout
        is raised as it is: the request's time bound for its store (iam.store.Store) allows no second try.
        """
        pooled = await self._direct_connection()
        done = False
        # SQLAlchemy's timing and tracing events skip these statements: time (and trace) them here.
        span = store_span("token", "postgresql", statement)
        started = time.perf_counter()
        try:
            result = await call(pooled.driver_connection)
            done = True
            _DIRECT_DURATION.observe(time.perf_counter() - started)
        except TimeoutError:
            # The store's time bound is spent: no second attempt (the request answers 503 now). The statement
            # may still commit; a retried issuance would be a second token the client never sees.
            raise
        except Exception as exc:
            log.debug("direct statement failed (%s); retrying through SQLAlchemy", exc.__class__.__name__)
            result = _FAILED
        finally:
            if span is not None:
                span.end()
            if done:
                self._direct_release(pooled)
            else:
                pooled.invalidate()  # failed or cancelled mid-statement: closed, its pool slot freed
        return result

    async def _direct_connection(self) -> Any:
        """A pooled connection for `_on_driver`: the one it used last, if still open, else a checkout."""
        idle = self._direct_idle
        while idle:
            pooled = idle.pop()
            if not pooled.driver_connection.is_closed():
                return pooled
            pooled.invalidate()  # closed by the server while it waited here, as the pool's checkout check does
        dbapi_error = self.engine.dialect.loaded_dbapi.Error
        try:
            return await self.engine.raw_connection()
        except dbapi_error as exc:  # cannot connect: reported as SQLAlchemy reports it everywhere else
            raise DBAPIError.instance(None, None, exc, dbapi_error, dialect=self.engine.dialect) from exc

    def _direct_release(self, pooled: Any) -> None:
        # Kept checked out for the next direct statement (a list pop, where a checkout and a checkin of SQLAlchemy's
        # pool cost a cache-miss introspection about 7 % of its time), up to DIRECT_IDLE; the rest go back.
        if len(self._direct_idle) < DIRECT_IDLE and not self._closing:
            self._direct_idle.append(pooled)
        else:
            pooled.close()

    async def revoke_token(self, digest: bytes, client_id: str) -> bool:
        """Revoke a token only for the client it was issued to (RFC 7009 §2.1).

        A refresh token takes its whole grant along (§2.1: "SHOULD also invalidate the access tokens").
        """
        async with self._revoking() as (conn, revoked):
            result = await conn.execute(
                update(access_tokens)
                .where(access_tokens.c.digest == digest, access_tokens.c.client_id == client_id)
                .values(revoked=True)
            )
            if result.rowcount:
                await revoked.digest(conn, digest)
                return True
            grant_id = (
                await conn.execute(
                    select(refresh_tokens.c.grant_id)
                    .join(grants, grants.c.id == refresh_tokens.c.grant_id)
                    .where(refresh_tokens.c.digest == digest, grants.c.client_id == client_id)
                )
            ).scalar()
            if grant_id is None:
                return False
            await _revoke_grant(conn, grant_id)
            await revoked.grant(conn, grant_id)
            return True

    @contextlib.asynccontextmanager
    async def _revoking(self) -> AsyncIterator[tuple[AsyncConnection, _Revocations]]:
        """A transaction that revokes: its notices go out with its commit, local evictions follow it."""
        revoked = _Revocations(self._postgresql)
        try:
            async with self.engine.begin() as conn:
                yield conn, revoked
        finally:
            # After the commit (or its failure: evicting too much is harmless). A concurrent lookup that
            # read the row before the commit cannot put it back: eviction bumps the cache's generation.
            revoked.evict(self.cache)

    # -- client assertions -----------------------------------------------------------------------------------
    async def use_assertion_jti(self, digest: bytes, client_id: str, expires_at: int) -> bool:
        """Record a client assertion's jti; False if it was recorded before (a replay). One autocommit INSERT:
        the primary key decides between concurrent uses, on every replica."""
        try:
            async with self.reader.connect() as conn:
                await conn.execute(insert(assertion_jtis).values(
                    digest=digest, client_id=client_id, expires_at=expires_at))
        except IntegrityError:
            return False
        return True

    # -- pending authorization requests -------------------------------------------------------------------
    async def add_request(self, values: dict[str, Any]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(authorization_requests).values(values))

    async def take_request(self, request_id: str, client_id: str | None = None) -> dict[str, Any] | None:
        """Consume a pending request (of this client, if given): whoever deletes it first owns it (single use)."""
        condition = authorization_requests.c.id == request_id
        if client_id is not None:
            condition &= authorization_requests.c.client_id == client_id
        async with self.engine.begin() as conn:
            found = (await conn.execute(select(authorization_requests).where(condition))).first()
            if found is None:
                return None
            deleted = await conn.execute(delete(authorization_requests).where(condition))
            return _row(found) if deleted.rowcount == 1 else None

    # -- grants, codes, refresh tokens --------------------------------------------------------------------
    async def add_grant_with_code(self, grant: dict[str, Any], code: dict[str, Any]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(grants).values(grant))
            await conn.execute(insert(codes).values(code))

    async def find_code(self, digest: bytes) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            found = (
                await conn.execute(
                    select(codes, *_GRANT_COLUMNS).join(grants, grants.c.id == codes.c.grant_id)
                    .where(codes.c.digest == digest)
                )
            ).first()
        return None if found is None else _row(found)

    async def redeem_code(self, digest: bytes, access: AccessTokenRow, refresh: RefreshTokenRow | None,
                          bind: tuple[str, Holder] | None = None) -> bool:
        """Mark the code used and store what it bought, atomically; False if another request won the race.
        `bind` (grant id, holder) binds the grant's refresh tokens to that DPoP key or certificate."""
        async with self.engine.begin() as conn:
            won = await conn.execute(
                update(codes).where(codes.c.digest == digest, codes.c.consumed.is_(False)).values(consumed=True)
            )
            if won.rowcount != 1:
                return False
            await _add_tokens(conn, access, refresh, bind)
        return True

    async def find_refresh_token(self, digest: bytes) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            found = (
                await conn.execute(
                    select(refresh_tokens, *_GRANT_COLUMNS).join(grants, grants.c.id == refresh_tokens.c.grant_id)
                    .where(refresh_tokens.c.digest == digest)
                )
            ).first()
        return None if found is None else _row(found)

    async def rotate_refresh_token(
        self, digest: bytes, now: int, access: AccessTokenRow, refresh: RefreshTokenRow | None,
        successor: bytes | None,
    ) -> bool:
        """Spend a refresh token and store its successors, atomically; False if it was already spent."""
        async with self.engine.begin() as conn:
            won = await conn.execute(
                update(refresh_tokens)
                .where(
                    refresh_tokens.c.digest == digest,
                    refresh_tokens.c.used_at.is_(None),
                    refresh_tokens.c.revoked.is_(False),
                )
                .values(used_at=now, successor=successor)
            )
            if won.rowcount != 1:
                return False
            await _add_tokens(conn, access, refresh)
        return True

    async def revoke_grant(self, grant_id: str) -> None:
        async with self._revoking() as (conn, revoked):
            await _revoke_grant(conn, grant_id)
            await revoked.grant(conn, grant_id)

    async def revoke_session_grants(self, sid: str, client_id: str) -> int:
        """Logout: revoke what this client was granted in this session, and nothing of other clients."""
        return await self._revoke_grants(grants.c.sid == sid, grants.c.client_id == client_id)

    async def revoke_client_grants(self, subject: str, client_id: str) -> int:
        """A person removes an application's access: every live grant of theirs to that client ends."""
        return await self._revoke_grants(grants.c.subject == subject, grants.c.client_id == client_id,
                                         grants.c.revoked.is_(False))

    async def _revoke_grants(self, *conditions: ColumnElement[bool]) -> int:
        async with self._revoking() as (conn, revoked):
            ids = (await conn.execute(select(grants.c.id).where(*conditions))).scalars().all()
            for grant_id in ids:
                await _revoke_grant(conn, grant_id)
                await revoked.grant(conn, grant_id)
        return len(ids)

    async def live_grants(self, subject: str, now: int) -> list[dict[str, Any]]:
        """A person's grants that can still yield a token: unexpired, unrevoked, with a live access or refresh
        token."""
        live_access = select(access_tokens.c.digest).where(
            access_tokens.c.grant_id == grants.c.id, access_tokens.c.revoked.is_(False),
            access_tokens.c.expires_at > now)
        live_refresh = select(refresh_tokens.c.digest).where(
            refresh_tokens.c.grant_id == grants.c.id, refresh_tokens.c.revoked.is_(False),
            refresh_tokens.c.used_at.is_(None), refresh_tokens.c.expires_at > now)
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                select(grants.c.id, grants.c.client_id, grants.c.scope, grants.c.created_at, grants.c.expires_at,
                       grants.c.offline)
                .where(grants.c.subject == subject, grants.c.revoked.is_(False), grants.c.expires_at > now,
                       live_access.exists() | live_refresh.exists())
                .order_by(grants.c.created_at)
            )
            return [_row(row) for row in rows]

    async def session_clients(self, subject: str, sids: list[str] | None, now: int) -> list[tuple[str, str | None]]:
        """(client_id, sid) of the subject's unexpired grants in these sessions, or in any (`sids` None): revoked
        ones too, since the logout that ended a session may have revoked them a moment before."""
        condition = grants.c.subject == subject
        if sids is not None:
            condition &= grants.c.sid.in_(sids)
        async with self.engine.connect() as conn:
            rows = await conn.execute(select(grants.c.client_id, grants.c.sid).distinct()
                                      .where(condition, grants.c.expires_at > now))
            return [(row.client_id, row.sid) for row in rows]

    async def revoke_subject(self, subject: str) -> None:
        """A disabled or deleted user: every grant and token of theirs stops working."""
        async with self._revoking() as (conn, revoked):
            ids = (await conn.execute(select(grants.c.id).where(grants.c.subject == subject))).scalars().all()
            for grant_id in ids:
                await _revoke_grant(conn, grant_id)
            await revoked.subject(conn, subject)  # one notice covers all of them

    # -- device codes -------------------------------------------------------------------------------------
    async def add_device_code(self, values: dict[str, Any]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(device_codes).values(values))

    async def find_device_code(self, *, digest: bytes | None = None,
                               user_code: bytes | None = None) -> dict[str, Any] | None:
        where = device_codes.c.digest == digest if digest is not None else device_codes.c.user_code == user_code
        async with self.engine.connect() as conn:
            found = (await conn.execute(select(device_codes).where(where))).first()
        return None if found is None else _row(found)

    async def poll_device_code(self, digest: bytes, now: int, interval: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(device_codes).where(device_codes.c.digest == digest).values(last_poll=now, interval=interval)
            )

    async def decide_device_code(self, user_code: bytes, now: int, grant: dict[str, Any] | None) -> bool:
        """Approve (with the grant the person gave) or deny a pending device code, once."""
        async with self.engine.begin() as conn:
            values = {"status": "approved", "grant_id": grant["id"]} if grant else {"status": "denied"}
            won = await conn.execute(
                update(device_codes)
                .where(device_codes.c.user_code == user_code, device_codes.c.status == "pending",
                       device_codes.c.expires_at >= now)
                .values(values)
            )
            if won.rowcount != 1:
                return False
            if grant:
                await conn.execute(insert(grants).values(grant))
        return True

    async def find_grant(self, grant_id: str) -> dict[str, Any] | None:
        async with self.engine.connect() as conn:
            found = (
                await conn.execute(
                    select(grants.c.id.label("grant_id"), *_GRANT_COLUMNS).where(grants.c.id == grant_id)
                )
            ).first()
        return None if found is None else _row(found)

    async def redeem_device_code(self, digest: bytes, access: AccessTokenRow, refresh: RefreshTokenRow | None,
                                 bind: tuple[str, Holder] | None = None) -> bool:
        async with self.engine.begin() as conn:
            won = await conn.execute(
                update(device_codes)
                .where(device_codes.c.digest == digest, device_codes.c.status == "approved")
                .values(status="consumed")
            )
            if won.rowcount != 1:
                return False
            await _add_tokens(conn, access, refresh, bind)
        return True

    # -- housekeeping -------------------------------------------------------------------------------------
    async def purge_expired(self, now: int, batch: int) -> int:
        """Delete at most `batch` expired rows per table, each table's batch its own short transaction: bounded
        work per call, so a backlog never locks a table (iam.store.purge_until_done repeats it)."""
        total = 0
        async with self.reader.connect() as conn:  # autocommit: one transaction per DELETE
            for table, key, expiry, keep in (
                (access_tokens, access_tokens.c.digest, access_tokens.c.expires_at, 0),
                (refresh_tokens, refresh_tokens.c.digest, refresh_tokens.c.expires_at, 0),
                # Used codes stay a while after expiry, so a late replay still revokes what the code bought.
                (codes, codes.c.digest, codes.c.expires_at, CODE_REPLAY_MEMORY),
                # Pending authorization requests, pushed ones (RFC 9126) included.
                (authorization_requests, authorization_requests.c.id, authorization_requests.c.expires_at, 0),
                (device_codes, device_codes.c.digest, device_codes.c.expires_at, 0),
                (assertion_jtis, assertion_jtis.c.digest, assertion_jtis.c.expires_at, 0),
            ):
                total += (await conn.execute(delete(table).where(key.in_(doomed(key, expiry < now - keep,
                                                                                  batch=batch))))).rowcount
            # Initial access tokens that can register no more clients: expired, or used up.
            spent = doomed(initial_access_tokens.c.id, (initial_access_tokens.c.expires_at <= now)
                           | (initial_access_tokens.c.uses_left <= 0), batch=batch)
            total += (await conn.execute(delete(initial_access_tokens)
                                         .where(initial_access_tokens.c.id.in_(spent)))).rowcount
            # A grant goes once it has ended and no token of it is left.
            ended = doomed(
                grants.c.id, grants.c.expires_at < now,
                ~select(refresh_tokens.c.digest).where(refresh_tokens.c.grant_id == grants.c.id).exists(),
                batch=batch)
            total += (await conn.execute(delete(grants).where(grants.c.id.in_(ended)))).rowcount
        return total


def _access_params(row: AccessTokenRow) -> tuple[Any, ...]:
    """_INSERT_SQL's parameters, in its column order."""
    return (row.digest, row.client_id, row.subject, row.expires_at, row.revoked, row.jwt, row.grant_id)


def _access_values(row: AccessTokenRow) -> dict[str, Any]:
    return {
        "digest": row.digest,
        "client_id": row.client_id,
        "subject": row.subject,
        "expires_at": row.expires_at,
        "revoked": row.revoked,
        "jwt": row.jwt,
        "grant_id": row.grant_id,
    }


async def _add_tokens(conn: AsyncConnection, access: AccessTokenRow, refresh: RefreshTokenRow | None,
                      bind: tuple[str, Holder] | None = None) -> None:
    await conn.execute(insert(access_tokens).values(_access_values(access)))
    if bind is not None:
        grant_id, holder = bind
        column = "dpop_jkt" if holder.is_dpop else "cnf_x5t"
        await conn.execute(update(grants).where(grants.c.id == grant_id).values({column: holder.thumbprint}))
    if refresh is not None:
        await conn.execute(
            insert(refresh_tokens).values(
                digest=refresh.digest,
                grant_id=refresh.grant_id,
                issued_at=refresh.issued_at,
                expires_at=refresh.expires_at,
                revoked=False,
            )
        )


async def _revoke_grant(conn: AsyncConnection, grant_id: str) -> None:
    """Revoke a grant and every token of it; the caller tells the caches (`_Revocations.grant`)."""
    await conn.execute(update(grants).where(grants.c.id == grant_id).values(revoked=True))
    await conn.execute(update(refresh_tokens).where(refresh_tokens.c.grant_id == grant_id).values(revoked=True))
    await conn.execute(update(access_tokens).where(access_tokens.c.grant_id == grant_id).values(revoked=True))


class _Revocations:
    """What one revoking transaction revoked: notices for the other processes, evictions for this one.

    On PostgreSQL each notice is `pg_notify` inside the transaction, so listeners get it on commit and never
    for a rollback. On SQLite (one process) the local eviction is all there is to do.
    """

    def __init__(self, notify: bool) -> None:
        self._notify = notify
        self._digests: list[bytes] = []
        self._grants: list[str] = []
        self._subjects: list[str] = []

    async def digest(self, conn: AsyncConnection, digest: bytes) -> None:
        self._digests.append(digest)
        await self._send(conn, digest_payload(digest))

    async def grant(self, conn: AsyncConnection, grant_id: str) -> None:
        self._grants.append(grant_id)
        await self._send(conn, grant_payload(grant_id))

    async def subject(self, conn: AsyncConnection, subject: str) -> None:
        self._subjects.append(subject)
        await self._send(conn, subject_payload(subject))

    async def _send(self, conn: AsyncConnection, payload: str) -> None:
        if self._notify:
            await conn.execute(select(func.pg_notify(CHANNEL, payload)))

    def evict(self, cache: HotCache[Any] | None) -> None:
        if cache is None:
            return
        for digest in self._digests:
            cache.evict_digest(digest)
        for grant_id in self._grants:
            cache.evict_grant(grant_id)
        for subject in self._subjects:
            cache.evict_subject(subject)


class ClientRows:
    """The SQL of stored clients (iam/token/stored_clients.py holds the rules). Every change is one transaction
    that, on PostgreSQL, also sends its change notice (`pg_notify`), heard by the other replicas when it commits."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.reader = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._notify = engine.dialect.name == "postgresql"

    async def get(self, client_id: str) -> dict[str, Any] | None:
        async with self.reader.connect() as conn:
            row = (await conn.execute(select(clients).where(clients.c.client_id == client_id))).first()
        return None if row is None else _row(row)

    async def page(self, after: str | None, limit: int) -> list[dict[str, Any]]:
        """Up to `limit` rows in client_id order, after `after` (keyset pagination)."""
        query = select(clients).order_by(clients.c.client_id).limit(limit)
        if after is not None:
            query = query.where(clients.c.client_id > after)
        async with self.reader.connect() as conn:
            return [_row(row) for row in await conn.execute(query)]

    async def every(self) -> list[dict[str, Any]]:
        async with self.reader.connect() as conn:
            return [_row(row) for row in await conn.execute(select(clients))]

    async def fingerprint(self) -> tuple[int, int, int]:
        """(changes counted, rows, the sum of their versions): changes with every insert, update and delete. The
        count and sum catch the writes of a release before token_0013, which does not bump the counter."""
        changes = select(client_changes.c.changes).where(client_changes.c.id == 1).scalar_subquery()
        query = select(func.coalesce(changes, 0), func.count(), func.coalesce(func.sum(clients.c.version), 0))
        async with self.reader.connect() as conn:
            counted, count, versions = (await conn.execute(query.select_from(clients))).one()
        return int(counted), int(count), int(versions)

    async def insert(self, values: dict[str, Any], use: InitialTokenUse | None = None) -> None:
        """IntegrityError if the client_id is taken. With `use`, in the same transaction: one use of that initial
        access token is consumed (InitialTokenSpent if it has none left: expired, used up, revoked) and the
        registrations with it in the last minute are counted (RegistrationsThrottled at the limit). The UPDATE
        comes first: it locks the token's row, so concurrent registrations with one token take turns."""
        async with self.engine.begin() as conn:
            if use is not None:
                await _consume(conn, use)
            await conn.execute(insert(clients).values(values))
            await self._announce(conn, values["client_id"])

    async def by_registration_digest(self, digest: bytes) -> dict[str, Any] | None:
        """The client whose registration access token has this SHA-256 digest (RFC 7592)."""
        async with self.reader.connect() as conn:
            row = (await conn.execute(select(clients).where(clients.c.registration_digest == digest))).first()
        return None if row is None else _row(row)

    async def update(self, client_id: str, version: int, values: dict[str, Any]) -> dict[str, Any] | None:
        """Write `values` if the row is still at `version` (compare and set); the row as written, or None."""
        async with self.engine.begin() as conn:
            changed = await conn.execute(update(clients).where(
                clients.c.client_id == client_id, clients.c.version == version).values(values))
            if not changed.rowcount:
                return None
            row = (await conn.execute(select(clients).where(clients.c.client_id == client_id))).one()
            await self._announce(conn, client_id)
        return _row(row)

    async def delete(self, client_id: str, version: int) -> bool:
        async with self.engine.begin() as conn:
            deleted = await conn.execute(delete(clients).where(
                clients.c.client_id == client_id, clients.c.version == version))
            if not deleted.rowcount:
                return False
            await self._announce(conn, client_id)
        return True

    async def _announce(self, conn: AsyncConnection, client_id: str) -> None:
        await conn.execute(update(client_changes).where(client_changes.c.id == 1)
                           .values(changes=client_changes.c.changes + 1))
        if self._notify:
            await conn.execute(select(func.pg_notify(CHANNEL, client_payload(client_id))))


class InitialTokenSpent(Exception):
    """The initial access token can register no more clients: expired, used up, or revoked meanwhile."""


class RegistrationsThrottled(Exception):
    """The initial access token registered `limit` clients in the last minute; one more in `retry_after` s."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"retry in {retry_after} s")
        self.retry_after = retry_after


@dataclass(frozen=True, slots=True)
class InitialTokenUse:
    """One registration with an initial access token, consumed with the client's insert (ClientRows.insert)."""

    token_id: str
    now: int
    rate_limit: int  # registrations per RATE_WINDOW seconds


RATE_WINDOW = 60


async def _consume(conn: AsyncConnection, use: InitialTokenUse) -> None:
    tokens = initial_access_tokens.c
    # NULL - 1 stays NULL: a token of unlimited uses stays so.
    consumed = await conn.execute(update(initial_access_tokens).where(
        tokens.id == use.token_id, tokens.expires_at > use.now, tokens.uses_left.is_(None) | (tokens.uses_left > 0),
    ).values(uses_left=tokens.uses_left - 1))
    if not consumed.rowcount:
        raise InitialTokenSpent(use.token_id)
    recent, oldest = (await conn.execute(select(func.count(), func.min(clients.c.created_at)).where(
        clients.c.initial_token_id == use.token_id, clients.c.created_at > use.now - RATE_WINDOW))).one()
    if recent >= use.rate_limit:
        raise RegistrationsThrottled(max(1, int(oldest) + RATE_WINDOW - use.now))


class InitialTokenRows:
    """The SQL of initial access tokens (iam/token/initial_tokens.py holds the rules)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.reader = engine.execution_options(isolation_level="AUTOCOMMIT")

    async def insert(self, values: dict[str, Any]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(insert(initial_access_tokens).values(values))

    async def by_digest(self, digest: bytes) -> dict[str, Any] | None:
        async with self.reader.connect() as conn:
            row = (await conn.execute(select(initial_access_tokens)
                                      .where(initial_access_tokens.c.digest == digest))).first()
        return None if row is None else _row(row)

    async def every(self) -> list[dict[str, Any]]:
        """Every token, newest first."""
        async with self.reader.connect() as conn:
            return [_row(row) for row in await conn.execute(
                select(initial_access_tokens).order_by(initial_access_tokens.c.created_at.desc(),
                                                       initial_access_tokens.c.id))]

    async def delete(self, token_id: str) -> bool:
        async with self.engine.begin() as conn:
            deleted = await conn.execute(delete(initial_access_tokens).where(initial_access_tokens.c.id == token_id))
        return bool(deleted.rowcount)
