"""create_app(): the configured role(s) decide which routers are mounted and which stores are opened."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import FastAPI
from sqlalchemy import MetaData

from iam import __version__, errors, health, internal, pages
from iam.audit_store import AuditSink, purge_before
from iam.config import PEERS_NEEDED, Settings
from iam.keys import DATA_KEY, KeyRing, KeyRingError
from iam.observability import (
    AUDIT,
    SSO_SESSIONS,
    Observability,
    instrument_store,
    setup_tracing,
    shutdown_tracing,
)
from iam.peers import PeerKeys, RemoteCredentials, RemoteDirectory, RemoteTokens, ServiceIdentity
from iam.roles import Role
from iam.store import Store, StoreError, StoreUnreachable

log = logging.getLogger("iam")


def store_metadata(name: str) -> MetaData:
    """A store's tables, from its role's store module: imported lazily, so each role loads only its own."""
    if name == "token":
        from iam.token.store import metadata
    elif name == "authn":
        from iam.authn.store import metadata
    elif name == "users":
        from iam.users.store import metadata
    else:
        raise ValueError(name)
    return metadata


class StartupError(Exception):
    """Start-up cannot go on; the message is the one line an operator needs."""


class Runtime:
    """What a running instance holds: settings, its role's stores and services, keys, and its peers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.role = role = settings.role
        self.stores = {name: Store(name, getattr(settings.stores, name), store_metadata(name)) for name in role.stores}
        for store in self.stores.values():
            instrument_store(store)
        self.draining = False
        self._started = False
        self._tasks: list[asyncio.Task] = []
        self.audit_sink = AuditSink(self.stores) if settings.audit_store else None
        self.revocation_listener = None  # the token role's, on PostgreSQL (below)

        # Every role signs something (tokens, handoffs, service assertions) with its own key ring.
        self.keys = KeyRing(settings.keys.dir, settings.keys.activation_delay)
        remote = {peer: settings.peers.url(peer) for peer in PEERS_NEEDED[role]}
        self.http = httpx.AsyncClient() if remote else None
        self.identity = ServiceIdentity(role, self.keys)
        self.peer_keys = PeerKeys(self.keys, remote, self.http)

        def peer(cls, callee: Role):
            return cls(self.http, remote[callee], self.identity, callee)

        if role.serves(Role.AUTHENTICATION):
            from iam.authn.consent import Consents
            from iam.authn.credentials import CredentialService
            from iam.authn.sessions import Sessions
            from iam.authn.throttle import Throttle
            from iam.authn.totp import Totp

            engine = self.stores["authn"].engine
            self.credentials = CredentialService(engine)
            self.sessions = Sessions(engine, settings.session_ttl, settings.session_idle_ttl)
            self.throttle = Throttle(engine, self.identity, self.peer_keys)
            self.totp = Totp(engine)
            self.consents = Consents(engine)
            self.account_links = ([{"href": "/authn/kubeconfig", "text": "Get a kubeconfig"}]
                                  if settings.kubernetes.clusters else [])
        if role.serves(Role.USER_MANAGEMENT):
            from iam.users.directory import Directory

            credentials = self.credentials if role is Role.ALL else peer(RemoteCredentials, Role.AUTHENTICATION)
            self.directory_service = Directory(self.stores["users"].engine, credentials)
        if role in (Role.TOKEN, Role.AUTHENTICATION):
            self.directory = peer(RemoteDirectory, Role.USER_MANAGEMENT)
        elif role is Role.ALL:
            self.directory = self.directory_service
        if role.serves(Role.TOKEN):
            from iam.token.access_tokens import AccessTokens
            from iam.token.clients import ClientRegistry
            from iam.token.discovery import metadata_json
            from iam.token.endpoint import GRANTS
            from iam.token.hot_cache import HotCache, RevocationListener
            from iam.token.store import TokenStore

            self.clients = ClientRegistry(settings.clients)
            token_store = self.stores["token"]
            # Live token rows for introspection and forward-auth. On PostgreSQL the cache is on only while
            # the revocation listener is connected (other replicas revoke too); on SQLite (one process)
            # always.
            seconds = settings.introspection_cache_seconds
            self.hot_cache = HotCache(seconds, enabled=not token_store.is_postgresql)
            if token_store.is_postgresql and seconds:
                listener_name = {"application_name": RevocationListener.APPLICATION_NAME}
                self.revocation_listener = RevocationListener(
                    self.hot_cache, lambda: token_store.connect_driver(server_settings=listener_name))
            self.token_store = TokenStore(token_store.engine, self.hot_cache)
            self.access_tokens = AccessTokens(settings, self.keys, self.token_store, cache=self.hot_cache)
            self.metadata_json = metadata_json(settings, sorted(GRANTS))
            from iam.token.app_access import AppAccess
            from iam.token.device import DeviceApprovals

            self.tokens = self.access_tokens
            self.device_approvals = DeviceApprovals(self)
            self.app_access = AppAccess(self)
        else:
            self.tokens = peer(RemoteTokens, Role.TOKEN)
        if role is Role.AUTHENTICATION:
            self.device_approvals = self.app_access = peer(RemoteTokens, Role.TOKEN)
        if role.serves(Role.USER_MANAGEMENT):
            # A disabled or deleted user loses every grant and session at once, in whichever process they live.
            local = role is Role.ALL
            self.directory_service.on_disabled += [
                self.token_store.revoke_subject if local else self.tokens.revoke_subject,
                self.sessions.end_all if local else self.directory_service.credentials.end_sessions,
            ]

    async def start(self) -> None:
        """Open stores (migrating them if configured), load keys, start background jobs. Idempotent."""
        if self._started:
            return
        for store in self.stores.values():
            try:
                if self.settings.migrate_on_start:
                    await store.migrate()
                await store.check()
            except StoreUnreachable as exc:
                raise StartupError(str(exc)) from None
            except StoreError as exc:
                if self.settings.migrate_on_start:
                    raise StartupError(str(exc)) from None
                log.warning("%s; /health/ready answers 503 until then", exc)
        try:
            self.keys.load(generate=not any(self.settings.keys.dir.glob("*.json")))
        except (KeyRingError, OSError) as exc:
            raise StartupError(f"signing keys: {exc}") from None
        if self.role.serves(Role.AUTHENTICATION):
            self.totp.data_key = self._data_key()
        if self.audit_sink is not None:
            AUDIT.addHandler(self.audit_sink)
            AUDIT.setLevel(logging.INFO)
        self._tasks.append(asyncio.create_task(self._maintain()))
        if self.revocation_listener is not None:
            self.revocation_listener.start()
        self._started = True

    def _data_key(self) -> str | None:
        """The key directory's data key, created on first run where the directory is writable."""
        try:
            try:
                key = self.keys.data_key(generate=True)
            except OSError:  # a read-only mounted Secret: only what was provisioned
                key = self.keys.data_key()
        except (KeyRingError, OSError) as exc:
            raise StartupError(f"data key: {exc}") from None
        if key is None:
            log.warning("no %s in %s: TOTP secrets are stored unsealed (`iam keys rotate` creates it)",
                        DATA_KEY, self.settings.keys.dir)
        return key

    async def _maintain(self) -> None:
        """Pick up rotated keys; purge what has ended from the role's store, in bounded batches."""
        interval = self.settings.purge_interval
        last_purge = time.monotonic()
        while True:
            await asyncio.sleep(10)
            try:
                self.keys.reload_if_changed()
                if self.role.serves(Role.TOKEN):
                    self.hot_cache.sweep(time.time())
                await self.update_gauges()
                if self.audit_sink is not None:
                    await self.audit_sink.flush()
                if interval and time.monotonic() - last_purge >= interval:
                    last_purge = time.monotonic()
                    await self.purge(int(time.time()))
            except Exception:
                log.warning("maintenance failed; retrying later", exc_info=True)

    async def purge(self, now: int) -> int:
        """One bounded batch per table of what can never be used again: stores must not grow without end."""
        batch, deleted = self.settings.purge_batch, 0
        if self.role.serves(Role.TOKEN):
            deleted += await self.token_store.purge_expired(now, batch)
        if self.role.serves(Role.AUTHENTICATION):
            deleted += await self.sessions.purge_ended(now, batch)
            deleted += await self.throttle.purge_stale(now, batch)
        if self.audit_sink is not None:
            cutoff_ms = (now - self.settings.audit_retention_days * 86400) * 1000
            for store in self.stores.values():
                deleted += await purge_before(store, cutoff_ms, batch)
        return deleted

    async def update_gauges(self) -> None:
        """Gauges that need a store query are refreshed by the maintenance loop, not on every scrape."""
        if self.role.serves(Role.AUTHENTICATION):
            SSO_SESSIONS.set(await self.sessions.count_live())

    async def stop(self) -> None:
        self.draining = True
        shutdown_tracing()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.audit_sink is not None:
            AUDIT.removeHandler(self.audit_sink)
            await self.audit_sink.flush()  # what a store refuses now stays only in the audit log stream
        if self.revocation_listener is not None:
            await self.revocation_listener.stop()
        if self.http is not None:
            await self.http.aclose()
        for store in self.stores.values():
            await store.close()
        self._started = False


def create_app(settings: Settings) -> FastAPI:
    setup_tracing(f"iam-{settings.role.value}")
    runtime = Runtime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        yield
        await runtime.stop()

    # The Observability middleware owns request spans and metrics (the plain hot routes included): FastAPI's
    # native telemetry would trace every request a second time, as a separate root span.
    app = FastAPI(title="iam", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.iam = runtime
    app.add_middleware(Observability, headers=pages.every_response(settings.issuer))
    errors.install(app)
    app.include_router(health.router)
    if settings.role.serves(Role.TOKEN):
        # The hot paths right after the probes: routes are tried in order, and these carry most of the traffic.
        # Plain routes on the app's own router (iam.http.PlainRoute): no FastAPI per-request machinery.
        from iam.token import endpoint, introspection, phantom

        app.router.routes.extend([*phantom.routes, *introspection.routes, *endpoint.routes])
    app.include_router(internal.router)
    app.include_router(pages.router)
    role = settings.role
    if role.serves(Role.AUTHENTICATION):
        from iam.authn import account, consent, device, kubeconfig, login
        from iam.authn import internal as authn_internal

        for module in (login, consent, account, device, kubeconfig, authn_internal):
            app.include_router(module.router)
    if role.serves(Role.USER_MANAGEMENT):
        from iam.users import internal as users_internal
        from iam.users.scim import routes as scim_routes

        app.include_router(users_internal.router)
        app.include_router(scim_routes.router)
    if role.serves(Role.TOKEN):
        from iam.token import (
            app_access,
            authorize,
            device,
            discovery,
            endpoint,
            introspection,
            logout,
            revocation,
            userinfo,
        )

        for module in (authorize, endpoint, device, introspection, revocation, userinfo, logout, discovery,
                       app_access):
            app.include_router(module.router)
    return app
