"""`iam serve`: uvicorn, with a drain on SIGTERM so traffic stops arriving before the port closes.

On SIGTERM or SIGINT the instance first reports not-ready (`/health/ready` answers 503 "draining") and
keeps serving everything else for `drain_delay` seconds, while load balancers and Service endpoints take
it out of rotation. Then uvicorn shuts down gracefully: it stops accepting, lets in-flight requests finish
(at most `grace` seconds, then cancels them) and runs the lifespan shutdown. The process exits 0.
A second signal skips what is left of the drain delay; a second Ctrl+C during shutdown forces it, as in
plain uvicorn.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("iam")


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


def serve(app: FastAPI, host: str, port: int, grace: float, drain_delay: float, log_level: str, *,
          ssl_certfile: str | None = None, ssl_keyfile: str | None = None) -> None:
    import uvloop

    async def main() -> None:
        await app.state.iam.start()  # fails here, with one line, before the port opens
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level=log_level,
            log_config=None,  # the process's logging is set up once (iam.observability): JSON lines, quiet drivers
            access_log=False,
            server_header=False,
            proxy_headers=False,
            timeout_graceful_shutdown=grace,  # type: ignore[arg-type]  # uvicorn waits with asyncio: seconds may be fractional
            loop="none",
            ssl_certfile=ssl_certfile,  # https directly (kube-apiserver accepts only an https issuer)
            ssl_keyfile=ssl_keyfile,
        )
        await DrainingServer(config, app, drain_delay).serve()

    uvloop.run(main())
