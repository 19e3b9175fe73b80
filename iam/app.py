"""create_app(): the configured role(s) decide which routers are mounted, which stores are opened and which
services run; Runtime composes them and wires each role to its peers (docs/architecture.md)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import httpx
from fastapi import FastAPI
from sqlalchemy import MetaData
from starlette.types import ASGIApp

from iam import __version__, errors, health, internal, pages
from iam.audit_store import AuditSink, purge_before
from iam.config import PEERS_NEEDED, Settings
from iam.http import HotLane, PlainRoutes
from iam.keys import KeyRing, KeyRingError
from iam.observability import AUDIT, Observability, instrument_store, setup_tracing, shutdown_tracing
from iam.peers import (
    AppAccess,
    ClientView,
    Credentials,
    DeviceApprovals,
    Directory,
    PeerKeys,
    RemoteCredentials,
    RemoteDirectory,
    RemoteTokens,
    RemoteUpstreamChecks,
    ServiceIdentity,
    SessionEvents,
    Tokens,
    UpstreamAccounts,
    UpstreamChecks,
)
from iam.roles import Role
from iam.runtime import Shared, StartupError
from iam.store import Store, StoreError, StoreUnreachable, purge_until_done
from iam.tasks import cancel

if TYPE_CHECKING:  # each role's package is imported only where the role is played (see _token and the others)
    from iam.authn.services import AuthnServices
    from iam.token.services import TokenServices
    from iam.users.services import UserServices

log = logging.getLogger("iam")

__all__ = ["Runtime", "StartupError", "create_app", "store_metadata"]


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


class Runtime(Shared):
    """A running instance: what every role holds (iam/runtime.py), and the services of the role(s) it plays,
    one object per role (`token`, `authn`, `users`; None for a role played elsewhere). Each role's services
    own their stores' work; this class only wires the peers: in one process each other's services, apart the
    HTTP clients of iam/peers.py."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.role = role = settings.role
        self.stores = {name: Store(name, getattr(settings.stores, name), store_metadata(name),
                                   timeout=settings.store_timeout) for name in role.stores}
        for store in self.stores.values():
            instrument_store(store)
        self.draining = False
        self._started = False
        self._tasks: list[asyncio.Task[None]] = []
        self.audit_sink = AuditSink(self.stores) if settings.audit_store else None

        # Every role signs something (tokens, handoffs, service assertions) with its own key ring.
        self.keys = KeyRing(settings.keys.dir, settings.keys.activation_delay)
        remote = {peer: settings.peers.url(peer) for peer in PEERS_NEEDED[role]}
        self.http = http = httpx.AsyncClient() if remote else None
        self.identity = ServiceIdentity(role, self.keys)
        self.peer_keys = PeerKeys(self.keys, remote, self.http)

        self.token = token = self._token() if role.serves(Role.TOKEN) else None
        self.authn = authn = self._authn() if role.serves(Role.AUTHENTICATION) else None
        self.users = users = self._users() if role.serves(Role.USER_MANAGEMENT) else None

        def peer(callee: Role) -> tuple[httpx.AsyncClient, str, ServiceIdentity, Role]:
            assert http is not None  # PEERS_NEEDED names every role played elsewhere
            return http, remote[callee], self.identity, callee

        if users is not None:
            credentials: Credentials = (authn.credentials if authn is not None
                                        else RemoteCredentials(*peer(Role.AUTHENTICATION)))
            tokens: Tokens = token.access_tokens if token is not None else RemoteTokens(*peer(Role.TOKEN))
            users.connect(credentials, tokens)
        if token is None and authn is None:
            return
        directory: Directory
        upstream_accounts: UpstreamAccounts
        if users is not None:
            directory, upstream_accounts = users.directory, users.upstream
        else:
            directory = upstream_accounts = RemoteDirectory(*peer(Role.USER_MANAGEMENT))
        if token is not None:
            upstream_checks: UpstreamChecks = (authn.upstream_checks if authn is not None
                                               else RemoteUpstreamChecks(*peer(Role.AUTHENTICATION)))
            token.connect(directory, upstream_checks)
        if authn is not None:
            app_access: AppAccess
            device_approvals: DeviceApprovals
            session_events: SessionEvents
            if token is not None:
                app_access, device_approvals, session_events = (token.app_access, token.device_approvals,
                                                                token.backchannel)
            else:
                app_access = device_approvals = session_events = RemoteTokens(*peer(Role.TOKEN))
            authn.connect(directory, upstream_accounts, app_access, device_approvals, session_events)
            if token is not None:
                registry = token.clients
                authn.clients.connect(lambda client_id: None if (c := registry.get(client_id)) is None
                                      else ClientView.of(c))
            else:
                authn.clients.connect(RemoteTokens(*peer(Role.TOKEN)))

    def _token(self) -> TokenServices:
        from iam.token.endpoint import GRANTS
        from iam.token.services import TokenServices

        return TokenServices(self, sorted(GRANTS))

    def _authn(self) -> AuthnServices:
        from iam.authn.services import AuthnServices

        return AuthnServices(self)

    def _users(self) -> UserServices:
        from iam.users.services import UserServices

        return UserServices(self)

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
        if self.token is not None:
            self.token.check_keys()
        if self.authn is not None:
            self.authn.start()
        if self.audit_sink is not None:
            AUDIT.addHandler(self.audit_sink)
            AUDIT.setLevel(logging.INFO)
        self._tasks.append(asyncio.create_task(self._maintain()))
        if self.settings.purge_interval:
            self._tasks.append(asyncio.create_task(self._purge_regularly()))
        if self.token is not None:
            await self.token.start()
        self._started = True

    async def _maintain(self) -> None:
        """Pick up rotated keys, sweep the hot cache, refresh gauges, flush audit events."""
        while True:
            await asyncio.sleep(10)
            try:
                self.keys.reload_if_changed()
                if self.token is not None:
                    self.token.sweep()
                await self.update_gauges()
                if self.audit_sink is not None:
                    await self.audit_sink.flush()
            except Exception:
                log.warning("maintenance failed; retrying later", exc_info=True)

    async def _purge_regularly(self) -> None:
        """Purge every purge_interval seconds, give or take half of it: replicas started together (a rollout)
        spread their purges, and each purge skips the rows another replica is deleting (iam.store.doomed)."""
        interval = self.settings.purge_interval
        while True:
            await asyncio.sleep(interval * random.uniform(0.5, 1.5))
            try:
                deleted = await self.purge(int(time.time()))
                if deleted:
                    log.info("purged %d rows that can never be used again", deleted)
            except Exception:
                log.warning("purge failed; retrying later", exc_info=True)

    async def purge(self, now: int) -> int:
        """Delete what can never be used again, batch after batch until nothing is left or purge_budget seconds
        have passed: the stores stay bounded at any rate the server can sustain."""
        batch = self.settings.purge_batch
        steps: list[Callable[[], Awaitable[int]]] = []
        if (token := self.token) is not None:
            steps.append(lambda: token.purge(now, batch))
        if (authn := self.authn) is not None:
            steps.append(lambda: authn.purge(now, batch))
        if self.audit_sink is not None:
            cutoff_ms = (now - self.settings.audit_retention_days * 86400) * 1000
            steps += [functools.partial(purge_before, store, cutoff_ms, batch) for store in self.stores.values()]
        return await purge_until_done(steps, batch, self.settings.purge_budget)

    async def update_gauges(self) -> None:
        """Gauges that need a store query are refreshed by the maintenance loop, not on every scrape."""
        if self.authn is not None:
            await self.authn.update_gauges()

    async def stop(self) -> None:
        self.draining = True
        shutdown_tracing()
        await cancel(*self._tasks)
        self._tasks.clear()
        if self.audit_sink is not None:
            AUDIT.removeHandler(self.audit_sink)
            await self.audit_sink.flush()  # what a store refuses now stays only in the audit log stream
        if self.token is not None:
            await self.token.stop()
        if self.authn is not None:
            await self.authn.stop()
        if self.http is not None:
            await self.http.aclose()
        for store in self.stores.values():
            await store.close()
        self._started = False


class App(FastAPI):
    """The FastAPI app, with the Observability middleware outermost (its spans, metrics and headers cover every
    answer, a 500 included) and the hot lane just inside it."""

    hot_routes: PlainRoutes | None = None
    every_response: Sequence[tuple[bytes, bytes]] = ()

    def build_middleware_stack(self) -> ASGIApp:
        stack = super().build_middleware_stack()
        if self.hot_routes is not None:
            stack = HotLane(stack, self.hot_routes, self.exception_handlers)
        return Observability(stack, headers=self.every_response)


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
    app = App(title="iam", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
              openapi_url=None, telemetry={"tracing": False, "metrics": False, "logs": False})
    app.state.iam = runtime
    app.every_response = pages.every_response(settings.issuer)
    errors.install(app)
    if settings.role.serves(Role.TOKEN):
        # The hot paths, found by their path in one lookup (iam.http.PlainRoutes): they carry most of the traffic.
        # Their requests skip the app's middleware and routing (iam.http.HotLane); they are mounted first on the
        # app's router too, for what the hot lane leaves to it (a path with parameters, a method not served).
        from iam.token import discovery, endpoint, introspection, phantom

        app.hot_routes = PlainRoutes([*phantom.routes, *introspection.routes, *endpoint.routes, *discovery.routes])
        app.router.routes.append(app.hot_routes)
    app.include_router(health.router)
    app.include_router(internal.router)
    app.include_router(pages.router)
    role = settings.role
    if role.serves(Role.AUTHENTICATION):
        from iam.authn import account, connector_sign_in, consent, device, kubeconfig, login, reset
        from iam.authn import internal as authn_internal

        for module in (login, connector_sign_in, consent, account, reset, device, kubeconfig, authn_internal):
            app.include_router(module.router)
    if role.serves(Role.USER_MANAGEMENT):
        from iam.users import internal as users_internal
        from iam.users.scim import routes as scim_routes

        app.include_router(users_internal.router)
        app.include_router(scim_routes.router)
    if role.serves(Role.TOKEN):
        from iam.token import admin, authorize, logout, revocation, userinfo
        from iam.token import device as token_device
        from iam.token import internal as token_internal

        for module in (authorize, token_device, revocation, userinfo, logout, token_internal, admin):
            app.include_router(module.router)
        if settings.registration.enabled:  # off, its paths are unknown ones: 404
            from iam.token import registration

            app.include_router(registration.router)
    return app
