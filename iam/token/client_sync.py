"""Keeping the token role's `ClientRegistry` current without a restart.

- Stored clients: read once at start; then on PostgreSQL each change notice (`c:<client_id>` on the revocation
  channel, iam/token/hot_cache.py) reloads that client, and every (re)connect of the listener reloads them all
  (notices may have been missed meanwhile). On SQLite (one process by construction, but maybe several on one file)
  a cheap fingerprint check every `client_sync_interval` seconds catches another process's changes.
- Every reload, of one client or of all, runs in one queue, in the order asked, so an older read never overwrites a
  newer one. This process's own changes join that queue too (`changed`), and the change is answered only once it is
  applied: a full reload that read the store before the change cannot undo it afterwards.
- YAML clients: the config file is re-read every `config_reload_interval` seconds when its content changed (a new
  Secret mounted, an edited ConfigMap); its clients replace the running ones. An invalid file is logged and the
  running clients kept. Other settings still need a restart.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from iam.config import ConfigError, Settings, load_settings
from iam.tasks import cancel
from iam.token.clients import ClientRegistry
from iam.token.stored_clients import StoredClients

log = logging.getLogger("iam.token.clients")

RETRY = 1.0  # seconds before a failed reload is tried again (as a full one)


class ClientSync:
    def __init__(self, settings: Settings, registry: ClientRegistry, stored: StoredClients) -> None:
        self.settings = settings
        self.registry = registry
        self.stored = stored
        # Client ids to reload, None for all of them; with a future to resolve once done.
        self._queue: asyncio.Queue[tuple[str | None, asyncio.Future[None] | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._fingerprint: tuple[int, int, int] | None = None
        self._config_digest: bytes | None = None

    async def start(self) -> None:
        try:
            await self._reload_all()
        except Exception as exc:  # noqa: BLE001 - a store not migrated yet, unreachable: ready answers 503
            log.warning("stored clients not loaded (%s); retrying", exc.__class__.__name__)
            self._queue.put_nowait((None, None))
        self._config_digest = self._read_config_digest()
        self._tasks.append(asyncio.create_task(self._apply_notices(), name="iam-client-sync"))
        if self.stored.rows.engine.dialect.name != "postgresql":
            self._tasks.append(asyncio.create_task(self._check_regularly(), name="iam-client-check"))
        if self.settings.source is not None and self.settings.config_reload_interval:
            self._tasks.append(asyncio.create_task(self._watch_config(), name="iam-config-reload"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        await cancel(*tasks)
        while not self._queue.empty():  # nobody waits for a reload that will not run
            _, done = self._queue.get_nowait()
            if done is not None and not done.done():
                done.set_result(None)

    def notified(self, client_id: str) -> None:
        """A change notice for `client_id`: reload it, after whatever was notified before."""
        self._queue.put_nowait((client_id, None))

    async def changed(self, client_id: str) -> None:
        """This process committed a change of `client_id`: return once the registry has it."""
        await self._reload(client_id)

    async def resync(self) -> None:
        """Reload every stored client, after whatever was notified before (the listener (re)connected)."""
        await self._reload(None)

    async def _reload(self, client_id: str | None) -> None:
        if not self._tasks:  # not started, or stopped: no reload runs that could race this one
            await self._apply(client_id)
            return
        done = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((client_id, done))
        await done

    async def _apply(self, client_id: str | None) -> None:
        if client_id is None:
            await self._reload_all()
        else:
            self.registry.put_stored(client_id, await self.stored.servable(client_id))

    async def _reload_all(self) -> None:
        self._fingerprint = await self.stored.fingerprint()
        self.registry.set_stored(await self.stored.all())

    async def _apply_notices(self) -> None:
        while True:
            client_id, done = await self._queue.get()
            failed = False
            try:
                await self._apply(client_id)
            except Exception as exc:  # noqa: BLE001 - the store is away: read everything again once it is back
                log.warning("stored clients not reloaded (%s); retrying", exc.__class__.__name__)
                failed = True
            finally:
                if done is not None and not done.done():
                    done.set_result(None)
            if failed:
                await asyncio.sleep(RETRY)
                self._queue.put_nowait((None, None))

    async def _check_regularly(self) -> None:
        while True:
            await asyncio.sleep(self.settings.client_sync_interval)
            try:
                if await self.stored.fingerprint() != self._fingerprint:
                    self._queue.put_nowait((None, None))
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.debug("stored clients not checked (%s)", exc.__class__.__name__)

    def _read_config_digest(self) -> bytes | None:
        source = self.settings.source
        if source is None:
            return None
        try:
            return hashlib.sha256(source.read_bytes()).digest()
        except OSError:
            return None

    async def _watch_config(self) -> None:
        while True:
            await asyncio.sleep(self.settings.config_reload_interval)
            self.reload_config()

    def reload_config(self) -> bool:
        """Take the clients of the config file if its content changed; True if they were taken."""
        found = self._read_config_digest()
        if found is None or found == self._config_digest:
            return False
        self._config_digest = found
        try:
            settings = load_settings(self.settings.source)
        except ConfigError as exc:
            log.error("the changed config file is invalid; the running clients are kept: %s", exc)
            return False
        self.registry.set_yaml(settings.clients)
        log.info("config file changed: %d clients taken from it (other settings need a restart)",
                 len(settings.clients))
        return True
