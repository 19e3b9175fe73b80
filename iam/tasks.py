"""Background tasks: how every part of iam stops the ones it started."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("iam.tasks")

CANCEL_ATTEMPTS = 5
CANCEL_WAIT = 1.0  # seconds each cancellation is given


async def cancel(*tasks: asyncio.Task[None] | None) -> None:
    """Stop background tasks and wait until they have; a task that had failed is logged.

    A task that lets one cancellation slip (an awaitable finishing at the same moment can swallow it) is cancelled
    again, so that shutting down never waits for ever; one that still runs after that is logged and left behind.
    """
    pending = {task for task in tasks if task is not None}
    finished: set[asyncio.Task[None]] = set()
    for _attempt in range(CANCEL_ATTEMPTS):
        if not pending:
            break
        for task in pending:
            task.cancel()
        done, pending = await asyncio.wait(pending, timeout=CANCEL_WAIT)
        finished |= done
    for task in pending:
        log.warning("background task %s did not stop when cancelled; left running", task.get_name())
    for task in finished:
        if not task.cancelled() and (error := task.exception()) is not None:
            # Logged, not raised: the rest of the shutdown (stores closed, queues flushed) must still happen.
            log.error("background task %s had failed", task.get_name(), exc_info=error)
