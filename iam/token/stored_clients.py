"""Clients kept as data in the token store, beside the read-only clients of the YAML config.

The administration API (iam/token/admin.py) and `iam clients …` both go through `StoredClients`: one code path,
one set of rules (`ClientConfig`'s, via iam/token/client_metadata.py), one audit trail.

Secrets: the server generates every stored client's secret, `secrets.token_urlsafe(32)` (256 bits), shows it once
and keeps only its SHA-256 digest. A password needs a slow hash (argon2) because people choose guessable ones; a
uniformly random 256-bit secret cannot be guessed or looked up in any table, so a fast digest compared in constant
time is as safe, and keeps client authentication off the argon2 threads. A rotation keeps the previous digest,
with the instant it stops working (the grace period).

Every change is applied to this process's `ClientRegistry` once committed and, on PostgreSQL, announced with
`pg_notify` on the revocation channel inside the changing transaction (payload `c:<client_id>`), so every other
token-role replica reloads that client when, and only if, it commits (iam/token/hot_cache.py listens).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError

from iam.config import SECRET_METHODS, ClientConfig
from iam.observability import audit
from iam.token.client_metadata import ClientMetadataError, client_metadata, parse_client_metadata
from iam.token.store import ClientRows, InitialTokenUse

log = logging.getLogger("iam.token.clients")

SECRET_BYTES = 32  # 256 bits: see the module's docstring for why a SHA-256 digest is enough
CLIENT_ID_BYTES = 16


def new_client_id() -> str:
    """An id for a client whose creator named none: random, so it says nothing about how many there are."""
    return secrets.token_urlsafe(CLIENT_ID_BYTES)


def secret_digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class StoredClientError(Exception):
    """A refused change: `kind` is not_found (404), precondition (412, a stale If-Match), read_only (409, a client
    of the YAML config), no_secret (400, rotating the secret of a client that has none) or unreadable (409, a row
    this release cannot read: see `Unreadable`)."""

    def __init__(self, kind: Literal["not_found", "precondition", "read_only", "no_secret", "unreadable"],
                 message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _etag(version: int) -> str:
    """A stored client's entity tag (RFC 9110 §8.8.3): its version, which every change raises."""
    return f'"{version}"'


@dataclass(frozen=True, slots=True)
class StoredClient:
    config: ClientConfig
    enabled: bool
    version: int
    created_at: int
    updated_at: int
    secret_digest: bytes | None = field(default=None, repr=False)
    previous_secret_digest: bytes | None = field(default=None, repr=False)
    previous_expires_at: int | None = None
    # A dynamically registered client (RFC 7591): its initial access token's policy as it was (JSON); None for one
    # created by the administration API or the CLI, which has no registration access token either.
    registration_policy: str | None = None

    @property
    def client_id(self) -> str:
        return self.config.client_id

    @property
    def etag(self) -> str:
        return _etag(self.version)

    def describe(self) -> dict[str, Any]:
        """The client as the administration API and `iam clients show` tell it: never a secret."""
        return {"client_id": self.client_id, **client_metadata(self.config), "enabled": self.enabled,
                "source": "store", "client_id_issued_at": self.created_at, "updated_at": self.updated_at}


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A stored row this release cannot read as a client: metadata with a key it does not know (written by a newer
    release, during a rolling upgrade or after a rollback), or that its rules now refuse. It is not served (fail
    closed) and every other client still is; the API lists it, shows why, and may replace or delete it."""

    client_id: str
    enabled: bool
    version: int
    created_at: int
    updated_at: int
    reason: str
    secret_digest: bytes | None = field(default=None, repr=False)

    @property
    def etag(self) -> str:
        return _etag(self.version)

    def describe(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "enabled": self.enabled, "source": "store", "unreadable": self.reason,
                "client_id_issued_at": self.created_at, "updated_at": self.updated_at}


def _read(row: Mapping[str, Any]) -> StoredClient | Unreadable:
    try:
        return _from_row(row)
    except (ValueError, TypeError) as exc:  # ValidationError is a ValueError; so is bad JSON
        if isinstance(exc, ValidationError):
            reason = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'metadata'}: {e['msg']}" for e in exc.errors())
        else:
            reason = f"metadata: {exc.__class__.__name__}"
        return Unreadable(row["client_id"], bool(row["enabled"]), row["version"], row["created_at"],
                          row["updated_at"], reason, row["secret_digest"])


def _log_unreadable(read: Unreadable) -> None:
    log.warning("stored client %s is not served: this release cannot read it (%s)", read.client_id, read.reason)


def _readable(read: StoredClient | Unreadable) -> StoredClient:
    if isinstance(read, Unreadable):
        raise StoredClientError("unreadable", f"client {read.client_id!r} cannot be read by this release "
                                              f"({read.reason}): replace or delete it")
    return read


def _from_row(row: Mapping[str, Any]) -> StoredClient:
    return StoredClient(
        config=ClientConfig.model_validate({**json.loads(row["metadata"]), "client_id": row["client_id"]}),
        enabled=bool(row["enabled"]), version=row["version"], created_at=row["created_at"],
        updated_at=row["updated_at"], secret_digest=row["secret_digest"],
        previous_secret_digest=row["previous_secret_digest"], previous_expires_at=row["previous_expires_at"],
        registration_policy=row.get("registration_policy"))


def _stored_metadata(config: ClientConfig) -> str:
    return json.dumps(client_metadata(config), separators=(",", ":"), sort_keys=True)


def _matches(if_match: str | None, etag: str) -> bool:
    """RFC 9110 §13.1.1: `*`, or one of the listed entity tags, compared strongly (a weak tag never matches)."""
    if if_match is None:
        return True
    tags = [tag.strip() for tag in if_match.split(",")]
    return "*" in tags or etag in tags


@dataclass(frozen=True, slots=True)
class Registration:
    """What a client registered at the registration endpoint is stored with: the digest of its registration access
    token (RFC 7592 §1.1), its initial access token's policy (JSON) and the use of that token it consumes."""

    access_token_digest: bytes = field(repr=False)
    policy: str
    use: InitialTokenUse


class StoredClients:
    """Create, read, list, change, delete and rotate the secret of stored clients.

    `yaml_ids` tells the client ids of the YAML config (authoritative: never shadowed, never changed here);
    `check` refuses a client the rest of the configuration cannot serve (an unknown connector, say), raising
    ClientMetadataError; `changed` is awaited with the client_id after every committed change
    (`ClientSync.changed`: the local `ClientRegistry` has it before the caller is answered).
    """

    def __init__(self, rows: ClientRows, *, yaml_ids: Callable[[], frozenset[str]],
                 check: Callable[[ClientConfig], None], changed: Callable[[str], Awaitable[None]],
                 clock: Callable[[], float] = time.time) -> None:
        self.rows = rows
        self._yaml_ids = yaml_ids
        self._check = check
        self._changed = changed
        self._clock = clock
        self._last_read: dict[str, tuple[Mapping[str, Any], StoredClient | Unreadable]] = {}  # by `all`

    # -- reading ---------------------------------------------------------------------------------------------
    async def read(self, client_id: str) -> StoredClient | Unreadable | None:
        """The stored client as it is, readable by this release or not (the API shows why not), or None."""
        row = await self.rows.get(client_id)
        return None if row is None else _read(row)

    async def servable(self, client_id: str) -> StoredClient | None:
        """The stored client as the registry takes it: None for one that is gone, or unreadable (logged)."""
        read = await self.read(client_id)
        if isinstance(read, Unreadable):
            _log_unreadable(read)
            return None
        return read

    async def list(self, *, after: str | None, limit: int) -> builtins.list[StoredClient | Unreadable]:
        """Up to `limit` clients in client_id order, those after `after` (keyset pagination: stable and cheap)."""
        return [_read(row) for row in await self.rows.page(after, limit)]

    async def registered(self, registration_access_token: str) -> StoredClient | None:
        """The registered client whose registration access token this is (RFC 7592 §2), found by its digest."""
        row = await self.rows.by_registration_digest(secret_digest(registration_access_token))
        return None if row is None else _readable(_read(row))

    async def all(self) -> builtins.list[StoredClient]:
        """Every stored client. A row exactly as the last call read it gives the same StoredClient again, unparsed:
        a full reload of ten thousand clients (after a change another process made, or a reconnect) parses only
        the rows that changed, instead of holding the event loop for a third of a second."""
        last, self._last_read = self._last_read, {}
        for row in await self.rows.every():
            seen = last.get(row["client_id"])
            if seen is None or seen[0] != row:
                seen = row, _read(row)
                if isinstance(seen[1], Unreadable):
                    _log_unreadable(seen[1])  # once per content of the row: an unchanged row is not read again
            self._last_read[row["client_id"]] = seen
        return [read for _, read in self._last_read.values() if isinstance(read, StoredClient)]

    async def fingerprint(self) -> tuple[int, int, int]:
        """Changes with every create, change and delete (ClientRows.fingerprint): a cheap check for processes
        sharing one SQLite file, which hear no notifications."""
        return await self.rows.fingerprint()

    # -- changing --------------------------------------------------------------------------------------------
    async def create(self, config: ClientConfig, *, actor: str, enabled: bool = True,
                     registration: Registration | None = None) -> tuple[StoredClient, str | None]:
        """Store a new client (its id is the config's: `new_client_id()` for a caller who named none); the secret
        is generated for a client_secret_basic / client_secret_post client and returned here, once. A
        `registration` consumes its use of the initial access token with the insert (InitialTokenSpent,
        RegistrationsThrottled from iam/token/store.py if it cannot)."""
        if config.client_id in self._yaml_ids():
            raise ClientMetadataError("invalid_client_metadata",
                                      f"client_id: {config.client_id!r} is a client of the configuration file")
        config = self._checked(config)
        secret = secrets.token_urlsafe(SECRET_BYTES) if config.token_endpoint_auth_method in SECRET_METHODS else None
        now = int(self._clock())
        stored = StoredClient(config, enabled, 1, now, now, None if secret is None else secret_digest(secret),
                              registration_policy=None if registration is None else registration.policy)
        registered = {} if registration is None else {
            "registration_digest": registration.access_token_digest, "initial_token_id": registration.use.token_id,
            "registration_policy": registration.policy}
        try:
            await self.rows.insert({"client_id": stored.client_id, "metadata": _stored_metadata(config),
                                    "secret_digest": stored.secret_digest, "enabled": enabled, "version": 1,
                                    "created_at": now, "updated_at": now, **registered},
                                   None if registration is None else registration.use)
        except IntegrityError:
            raise ClientMetadataError("invalid_client_metadata",
                                      f"client_id: {config.client_id!r} is taken") from None
        await self._changed(stored.client_id)
        audit("client.created" if registration is None else "client.registered", actor=actor,
              client_id=stored.client_id)
        return stored, secret

    async def replace(self, client_id: str, config: ClientConfig, *, if_match: str | None, actor: str,
                      enabled: bool | None = None) -> tuple[StoredClient, str | None]:
        """Replace a client's metadata (and `enabled`, if given). A client that becomes a secret-authenticated
        one gets a new secret (returned, once); one that stops being one loses its secrets."""
        if config.client_id != client_id:
            raise ClientMetadataError("invalid_client_metadata", "client_id: cannot be changed")
        current = await self._current_row(client_id, if_match)  # an unreadable row may be replaced: that mends it
        config = self._checked(config)
        secret = None
        digests: dict[str, Any] = {}
        if config.token_endpoint_auth_method not in SECRET_METHODS:
            digests = {"secret_digest": None, "previous_secret_digest": None, "previous_expires_at": None}
        elif current.secret_digest is None:
            secret = secrets.token_urlsafe(SECRET_BYTES)
            digests = {"secret_digest": secret_digest(secret)}
        stored = await self._update(current, actor, metadata=_stored_metadata(config),
                                    enabled=current.enabled if enabled is None else enabled, **digests)
        return stored, secret

    async def patch(self, client_id: str, changes: dict[str, Any], *, if_match: str | None, actor: str,
                    ) -> tuple[StoredClient, str | None]:
        """A JSON merge patch (RFC 7396) of a client's metadata: a member set to null returns to its default;
        `enabled` (true / false) enables or disables the client."""
        if not isinstance(changes, dict):
            raise ClientMetadataError("invalid_client_metadata", "the changes must be a JSON object")
        changes = dict(changes)
        enabled = changes.pop("enabled", None)
        if enabled is not None and not isinstance(enabled, bool):
            raise ClientMetadataError("invalid_client_metadata", "enabled: must be true or false")
        current = await self._current(client_id, if_match)
        merged = client_metadata(current.config)
        for name, value in changes.items():
            if value is None:
                merged.pop(name, None)
            else:
                merged[name] = value
        config = parse_client_metadata(merged, client_id=client_id)
        return await self.replace(client_id, config, if_match=current.etag, actor=actor, enabled=enabled)

    async def delete(self, client_id: str, *, if_match: str | None, actor: str) -> None:
        current = await self._current_row(client_id, if_match)
        if not await self.rows.delete(client_id, current.version):
            raise StoredClientError("precondition", f"client {client_id!r} changed meanwhile")
        await self._changed(client_id)
        audit("client.deleted", actor=actor, client_id=client_id)

    async def rotate_secret(self, client_id: str, *, grace: int, actor: str, if_match: str | None = None,
                            ) -> tuple[StoredClient, str]:
        """A new secret (returned, once, with the client as it now is); the current one keeps working for `grace`
        more seconds, then stops.
        With `if_match`, only while the client is still at that ETag: of two concurrent rotations the second would
        otherwise cut off at once the secret the first one left working for its grace."""
        current = await self._current(client_id, if_match)
        if current.config.token_endpoint_auth_method not in SECRET_METHODS:
            raise StoredClientError("no_secret", f"client {client_id!r} authenticates with "
                                                 f"{current.config.token_endpoint_auth_method}: it has no secret")
        secret = secrets.token_urlsafe(SECRET_BYTES)
        keep = grace > 0 and current.secret_digest is not None
        stored = await self._update(current, actor, event="client.secret_rotated",
                                    secret_digest=secret_digest(secret),
                                    previous_secret_digest=current.secret_digest if keep else None,
                                    previous_expires_at=int(self._clock()) + grace if keep else None)
        return stored, secret

    # -- the parts -------------------------------------------------------------------------------------------
    def _checked(self, config: ClientConfig) -> ClientConfig:
        """The config as stored: without any secret (the digests are kept apart), passing the settings' checks."""
        config = config.model_copy(update={"client_secret": None, "client_secret_hash": None})
        self._check(config)
        return config

    async def _current(self, client_id: str, if_match: str | None) -> StoredClient:
        return _readable(await self._current_row(client_id, if_match))

    async def _current_row(self, client_id: str, if_match: str | None) -> StoredClient | Unreadable:
        """The client to change, at the version If-Match names; an unreadable one only for a replace or delete."""
        if client_id in self._yaml_ids():
            raise StoredClientError("read_only", f"client {client_id!r} is declared in the configuration file: "
                                                 "change it there")
        current = await self.read(client_id)
        if current is None:
            raise StoredClientError("not_found", f"no client {client_id!r}")
        if not _matches(if_match, current.etag):
            raise StoredClientError("precondition", f"client {client_id!r} has changed (ETag {current.etag})")
        return current

    async def _update(self, current: StoredClient | Unreadable, actor: str, *, event: str = "client.updated",
                      **values: Any) -> StoredClient:
        """Write `values` if the client is still at `current`'s version (compare and set: of two concurrent
        changes one wins, the other is told its precondition failed)."""
        now = int(self._clock())
        values = {"version": current.version + 1, "updated_at": now, **values}
        row = await self.rows.update(current.client_id, current.version, values)
        if row is None:
            raise StoredClientError("precondition", f"client {current.client_id!r} changed meanwhile")
        stored = _from_row(row)
        await self._changed(stored.client_id)
        audit(event, actor=actor, client_id=stored.client_id)
        return stored
