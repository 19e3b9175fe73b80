"""create_app(): the configured role(s) decide which routers are mounted and which stores are opened."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI

from iam import __version__, errors, health
from iam.config import Settings
from iam.keys import KeyRing
from iam.roles import Role
from iam.store import Store, StoreError, StoreUnreachable

log = logging.getLogger("iam")


class StartupError(Exception):
    """Start-up cannot go on; the message is the one line an operator needs."""


class Runtime:
    """What a running instance holds: settings, its role's stores, and (token role) keys and clients."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.role = settings.role
        self.stores = {name: Store(name, getattr(settings.stores, name)) for name in self.role.stores}
        self.draining = False
        self._started = False
        self._tasks: list[asyncio.Task] = []
        if self.role.serves(Role.TOKEN):
            from iam.token.access_tokens import AccessTokens
            from iam.token.clients import ClientRegistry
            from iam.token.discovery import metadata_json
            from iam.token.endpoint import GRANTS
            from iam.token.store import TokenStore

            self.keys = KeyRing(settings.keys.dir, settings.keys.activation_delay)
            self.clients = ClientRegistry(settings.clients)
            self.token_store = TokenStore(self.stores["token"].engine)
            self.access_tokens = AccessTokens(settings, self.keys, self.token_store)
            self.metadata_json = metadata_json(settings, sorted(GRANTS))

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
        if self.role.serves(Role.TOKEN):
            from iam.keys import KeyRingError

            try:
                self.keys.load(generate=not any(self.settings.keys.dir.glob("*.json")))
            except (KeyRingError, OSError) as exc:
                raise StartupError(f"signing keys: {exc}") from None
            self._tasks.append(asyncio.create_task(self._maintain_tokens()))
        self._started = True

    async def _maintain_tokens(self) -> None:
        """Purge expired tokens in bounded batches and pick up rotated keys."""
        interval = self.settings.purge_interval
        last_purge = time.monotonic()
        while True:
            await asyncio.sleep(10)
            try:
                self.keys.reload_if_changed()
                if interval and time.monotonic() - last_purge >= interval:
                    last_purge = time.monotonic()
                    await self.token_store.purge_expired(int(time.time()), self.settings.purge_batch)
            except Exception:
                log.warning("token maintenance failed; retrying later", exc_info=True)

    async def stop(self) -> None:
        self.draining = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for store in self.stores.values():
            await store.close()
        self._started = False


def create_app(settings: Settings) -> FastAPI:
    runtime = Runtime(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await runtime.start()
        yield
        await runtime.stop()

    app = FastAPI(
        title="iam",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.iam = runtime
    errors.install(app)
    app.include_router(health.router)
    if settings.role.serves(Role.TOKEN):
        from iam.token import discovery, endpoint, introspection, phantom, revocation

        for module in (endpoint, introspection, phantom, revocation, discovery):
            app.include_router(module.router)
    return app
