"""`iam serve`: uvicorn, with a drain on SIGTERM so traffic stops arriving before the port closes.

On SIGTERM or SIGINT the instance first reports not-ready (`/health/ready` answers 503 "draining") and
keeps serving everything else for `drain_delay` seconds, while load balancers and Service endpoints take
it out of rotation. Every response during the drain carries `Connection: close`, so clients on keep-alive
connections (which never look at readiness) open their next connection elsewhere.

Then the listener closes without dropping a request: new connections are refused first (Linux), what is
already in the accept queue is accepted, requests already written on open connections are read and
answered. Then uvicorn shuts down gracefully: it lets in-flight requests finish (at most `grace` seconds,
then cancels them) and runs the lifespan shutdown. The process exits 0.
A second signal skips what is left of the drain delay; a second Ctrl+C during shutdown forces it, as in
plain uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import signal
import socket
import ssl
import struct
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from iam.cpu import describe, share_one_cpu
from iam.security import HASHING

log = logging.getLogger("iam")

SETTLE = 0.2  # seconds for the event loop to accept queued connections and read requests already sent


class CloseWhileDraining:
    """ASGI wrapper: while the instance drains, each response tells the client to close its connection."""

    def __init__(self, app, runtime) -> None:
        self.app = app
        self.runtime = runtime

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        runtime = self.runtime

        async def send_closing(message) -> None:
            if message["type"] == "http.response.start" and runtime.draining:
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, send_closing)


class CoalescedWrites:
    """A connection's transport whose writes in one event-loop turn leave as one.

    uvicorn writes a response's status line and headers, then its body: two sends, and on loopback or a fast
    network two wake-ups of the client, for what is one small response. Joined, they cost one; the profile of
    token issuance had 21 % of the process in those two sends. Everything else is the real transport's."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(data)

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()  # what was written goes out before the close
        self._transport.close()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + sum(map(len, self._pending))

    def __getattr__(self, name: str):
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, writing through `CoalescedWrites`; on a TLS connection with a client
    certificate, each request's scope carries it as the ASGI TLS extension's `client_cert_chain` (uvicorn does
    not fill that extension)."""

    _tls: dict | None = None

    def connection_made(self, transport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:  # the handshake is done: the peer's certificate is known, if it sent one
            der = ssl_object.getpeercert(binary_form=True)
            if der:
                self._tls = {"client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)]}
        super().connection_made(CoalescedWrites(transport, self.loop))  # type: ignore[arg-type]

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls is not None:
            self.scope["extensions"] = {"tls": self._tls}


# A classic BPF program of one instruction, "return 0": on a listening socket, every new SYN is dropped.
_DROP_ALL = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0))
_SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)


def _refuse_new_connections(sock) -> None:
    # Closing a listener resets the connections still in its accept queue (a request may already be written
    # on them). Dropping new SYNs first, then accepting what is queued, leaves nothing there to reset; a
    # client whose SYN was dropped retries, and is refused once the port is closed.
    program = struct.pack("HL", 1, ctypes.addressof(_DROP_ALL))
    with contextlib.suppress(OSError):  # not Linux: plain close
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, program)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI, drain_delay: float) -> None:
        super().__init__(config)
        self.runtime = app.state.iam
        self.drain_delay = drain_delay
        self.stop_at: float | None = None  # monotonic time at which the drain ends and shutdown starts
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it only sets flags (no logging, no loop calls); `on_tick` acts on them.
        # Unlike uvicorn's own handler it does not record the signal for re-raising after shutdown:
        # a drained shutdown is a clean exit (status 0), not a death by signal.
        if self.stop_at is None:
            self.runtime.draining = True
            self.stop_at = time.monotonic() + self.drain_delay
        elif self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        # uvicorn's main loop calls this every 0.1 s; should_exit starts its graceful shutdown.
        if self.stop_at is not None:
            if not self._announced:
                self._announced = True
                log.info("draining: /health/ready answers 503; shutting down in %.1f s", self.drain_delay)
            if time.monotonic() >= self.stop_at:
                self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            for sock in server.sockets:
                _refuse_new_connections(sock)
        await asyncio.sleep(SETTLE)  # what is in the accept queue is accepted
        for server in self.servers:
            server.close()
        await asyncio.sleep(SETTLE)  # a request written on an open connection is read: that connection is busy
        # uvicorn closes idle connections at once and each busy one after its response.
        await super().shutdown(sockets)


def freeze_startup_objects() -> None:
    """Move what start-up built (modules, the app, settings, pools: about 150k objects) out of the collector's
    reach. They live as long as the process, yet each full collection walked them all: a pause of 30-100 ms
    that every request in flight waited out, the p99 of the paths that allocate (a store lookup, issuance)."""
    gc.collect()
    gc.freeze()


def place_hashing_threads() -> None:
    """Under a CPU limit below two CPUs, keep every thread of the process on one CPU (iam/cpu.py)."""
    cpu = share_one_cpu() if HASHING.share_one_cpu else None
    log.info(describe(HASHING, cpu))


def serve(app: FastAPI, host: str, port: int, grace: float, drain_delay: float, log_level: str, *,
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None, ssl_ca_certs: str | None = None,
          ssl_cert_reqs: int = ssl.CERT_NONE) -> None:
    import uvloop

    async def main() -> None:
        await app.state.iam.start()  # fails here, with one line, before the port opens
        place_hashing_threads()  # the threads started so far move too; those started later inherit the CPU
        freeze_startup_objects()
        config = uvicorn.Config(
            CloseWhileDraining(app, app.state.iam),
            host=host,
            port=port,
            log_level=log_level,
            log_config=None,  # the process's logging is set up once (iam.observability): JSON lines, quiet drivers
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=grace,  # type: ignore[arg-type]  # uvicorn waits with asyncio: seconds may be fractional
            loop="none",
            http=HttpProtocol,
            ssl_certfile=ssl_certfile,  # https directly (kube-apiserver accepts only an https issuer)
            ssl_keyfile=ssl_keyfile,
            ssl_ca_certs=ssl_ca_certs,  # client certificates (RFC 8705), in the scope's TLS extension
            ssl_cert_reqs=ssl_cert_reqs,
        )
        await DrainingServer(config, app, drain_delay).serve()

    uvloop.run(main())
