"""The clients the sign-in pages are for: their name, the connectors they offer, whether they ask for consent.

Clients of the config file are read from this role's own settings. Stored clients live in the token role's store,
which this role never opens: in one process (`SERVICE_ROLE=all`) they are read from the token role's registry, at
once; apart, this role copies their views from the token role's internal API every `client_sync_interval` seconds
(`GET /internal/v1/clients`, answered 304 while nothing changed). Pages look a client up in memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from iam.config import Settings
from iam.peers import ClientView, RemoteTokens
from iam.tasks import cancel

log = logging.getLogger("iam.authn.clients")


class SignInClients:
    def __init__(self, settings: Settings) -> None:
        self.interval = settings.client_sync_interval
        self._configured = {client.client_id: ClientView.of(client) for client in settings.clients}
        self._local: Callable[[str], ClientView | None] | None = None
        self._remote: RemoteTokens | None = None
        self._copied: dict[str, ClientView] = {}
        self._etag: str | None = None
        self._task: asyncio.Task[None] | None = None

    def connect(self, source: Callable[[str], ClientView | None] | RemoteTokens) -> None:
        """`source`: the token role's lookup in this process, or its internal API."""
        if isinstance(source, RemoteTokens):
            self._remote = source
        else:
            self._local = source

    def get(self, client_id: str | None) -> ClientView | None:
        if client_id is None:
            return None
        found = self._configured.get(client_id)
        if found is not None:
            return found
        if self._local is not None:
            return self._local(client_id)
        return self._copied.get(client_id)

    def start(self) -> None:
        if self._remote is not None and self._task is None:
            self._task = asyncio.create_task(self._copy_regularly(), name="iam-sign-in-clients")

    async def stop(self) -> None:
        task, self._task = self._task, None
        await cancel(task)

    async def refresh(self) -> None:
        assert self._remote is not None
        etag, views = await self._remote.client_views(self._etag)
        if views is not None:
            self._copied = {view.client_id: view for view in views}
            self._etag = etag

    async def _copy_regularly(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as exc:  # noqa: BLE001 - the token role is away: keep the last copy, ask again
                log.warning("stored clients not copied from the token role (%s)", exc.__class__.__name__)
            await asyncio.sleep(self.interval)
