"""OpenID Connect Back-Channel Logout 1.0: when an SSO session ends, the clients that took part in it are told.

The authentication role owns the sessions; whenever one ends (RP-initiated logout, `iam users sign-out`, a
password reset, an operator disabling the user) it tells the token role which (`POST /internal/v1/sessions/ended`,
or a plain call in one process). The token role finds the clients with a grant in that session (every grant of
the person when all their sessions ended), and POSTs each that registered a `backchannel_logout_uri` a signed
logout token (§2.4), form-encoded (§2.5).

Off the request path: the logout only queues the deliveries and answers at once. `backchannel_logout.concurrency`
workers deliver the bounded queue, each attempt bounded by `backchannel_logout.timeout`; a timeout, a connection
error or a 5xx is retried (`attempts`, backoff from `retry_delay`), a 4xx is the client's final word (§2.8).
Each attempt carries a fresh token (new `jti`): a receiver that processed an attempt whose answer was lost
rejects a replayed `jti`. Outcomes are counted in `iam_backchannel_logouts_total` and logged by client id; the
token itself never is.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from iam.config import BackChannelLogout, ClientConfig
from iam.keys import KeyRing
from iam.observability import BACKCHANNEL_LOGOUTS
from iam.tasks import cancel
from iam.token.clients import ClientRegistry
from iam.token.store import TokenStore

log = logging.getLogger("iam.token.backchannel")

LOGOUT_EVENT = "http://schemas.openid.net/event/backchannel-logout"  # §2.4 `events` member
LOGOUT_TOKEN_TYP = "logout+jwt"  # §2.4: explicitly typed, so it cannot pass for an ID token
LOGOUT_TOKEN_TTL = 120  # seconds: a logout token is used at once (§2.4 recommends a short lifetime)
SIGNING_ALG = "RS256"  # §2.4: signed as ID tokens are (id_token_signing_alg_values_supported)


@dataclass(frozen=True)
class Delivery:
    client: ClientConfig
    sub: str
    sid: str | None  # None: every session of `sub` at the client (§2.4)


def logout_token_claims(issuer: str, delivery: Delivery, now: int) -> dict[str, Any]:
    """§2.4: iss, aud, iat, exp, jti, events, and sub and/or sid; never a nonce (§2.4, §2.6 step 5)."""
    claims: dict[str, Any] = {"iss": issuer, "sub": delivery.sub, "aud": delivery.client.client_id, "iat": now,
                              "exp": now + LOGOUT_TOKEN_TTL, "jti": uuid.uuid4().hex, "events": {LOGOUT_EVENT: {}}}
    if delivery.sid is not None:
        claims["sid"] = delivery.sid
    return claims


def deliveries(clients: ClientRegistry, sub: str, participants: list[tuple[str, str | None]],
               every_session: bool) -> list[Delivery]:
    """Who is told what: for ended sessions, each client with a grant in one gets its `sid`; when every session
    of the person ended, each client gets one token for all of them (sub only), or one per session when it
    requires a `sid` (§2.2 backchannel_logout_session_required)."""
    found: dict[tuple[str, str | None], Delivery] = {}
    for client_id, sid in participants:
        client = clients.get(client_id)
        if client is None or not client.enabled or client.backchannel_logout_uri is None:
            continue
        if every_session and not client.backchannel_logout_session_required:
            sid = None
        elif sid is None:
            continue  # a grant outside any session (a device code, a token exchange): no sid to send
        found.setdefault((client_id, sid), Delivery(client, sub, sid))
    return list(found.values())


class BackChannelLogouts:
    """The delivery queue and its workers; `start()` runs them, `stop()` ends them."""

    def __init__(self, settings: BackChannelLogout, issuer: str, keys: KeyRing, store: TokenStore,
                 clients: ClientRegistry, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.issuer = issuer
        self.keys = keys
        self.store = store
        self.clients = clients
        self.clock = clock
        self._queue: asyncio.Queue[Delivery] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._http: httpx.AsyncClient | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue(self.settings.queue_size)
        # No redirects: the logout token goes to the registered URI and nowhere else.
        self._http = httpx.AsyncClient(follow_redirects=False, timeout=self.settings.timeout,
                                       limits=httpx.Limits(max_connections=self.settings.concurrency))
        self._workers = [asyncio.create_task(self._deliver_all(), name=f"iam back-channel logout {n}")
                         for n in range(self.settings.concurrency)]

    async def stop(self) -> None:
        """Deliver what is queued (for at most one attempt's timeout: `iam users sign-out` in one process exits
        right after), then end the workers."""
        if self._queue is not None:
            try:
                await asyncio.wait_for(self._queue.join(), self.settings.timeout)
            except TimeoutError:
                log.warning("back-channel logouts still under way at shutdown, and %d queued, were dropped",
                            self._queue.qsize())
        await cancel(*self._workers)
        self._workers = []
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def idle(self) -> None:
        """Until every queued logout token was delivered or given up (for tests)."""
        if self._queue is not None:
            await self._queue.join()

    async def sessions_ended(self, sub: str, sids: list[str] | None) -> int:
        """These SSO sessions of `sub` ended (all of them: `sids` None): queue a logout token for each client
        that took part. Returns how many were queued."""
        if self._queue is None or sids == []:
            return 0
        participants = await self.store.session_clients(sub, sids, int(self.clock()))
        queued = 0
        for delivery in deliveries(self.clients, sub, participants, every_session=sids is None):
            try:
                self._queue.put_nowait(delivery)
                queued += 1
            except asyncio.QueueFull:
                BACKCHANNEL_LOGOUTS.labels(delivery.client.client_id, "dropped").inc()
                log.error("back-channel logout queue full: the logout for client %s was dropped",
                          delivery.client.client_id)
        return queued

    async def _deliver_all(self) -> None:
        assert self._queue is not None
        while True:
            delivery = await self._queue.get()
            try:
                await self._deliver(delivery)
            except Exception:  # a worker must outlive any one delivery
                log.exception("back-channel logout to client %s failed", delivery.client.client_id)
            finally:
                self._queue.task_done()

    async def _deliver(self, delivery: Delivery) -> None:
        assert self._http is not None and delivery.client.backchannel_logout_uri is not None
        settings, client_id = self.settings, delivery.client.client_id
        delay = settings.retry_delay
        for attempt in range(1, settings.attempts + 1):
            token = self.keys.sign(logout_token_claims(self.issuer, delivery, int(self.clock())), alg=SIGNING_ALG,
                                   typ=LOGOUT_TOKEN_TYP)
            try:
                response = await self._http.post(delivery.client.backchannel_logout_uri,
                                                 data={"logout_token": token})
                outcome = f"answered {response.status_code}"
                if response.is_success:  # §2.8: 200 OK (204 tolerated)
                    BACKCHANNEL_LOGOUTS.labels(client_id, "delivered").inc()
                    log.info("back-channel logout delivered to client %s", client_id)
                    return
                if response.status_code < 500:  # §2.8: 400, the client refused the token; it will not change
                    break
            except httpx.HTTPError as exc:
                outcome = f"did not answer ({type(exc).__name__})"
            log.warning("back-channel logout attempt %d of %d to client %s: it %s", attempt, settings.attempts,
                        client_id, outcome)
            if attempt < settings.attempts:
                BACKCHANNEL_LOGOUTS.labels(client_id, "retried").inc()
                await asyncio.sleep(delay)
                delay *= 2
        BACKCHANNEL_LOGOUTS.labels(client_id, "failed").inc()
        log.error("back-channel logout to client %s failed: it %s", client_id, outcome)
