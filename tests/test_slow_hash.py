"""argon2 runs off the event loop, as many at once as the CPU plan allows (two without a CPU limit), at a lower CPU
priority (iam/security.py slow_hash; the plan: iam/cpu.py, tests/test_cpu.py)."""

import asyncio
import os
import sys
import threading

import pytest

from iam.security import HASHING, slow_hash


async def test_slow_hashes_run_off_the_event_loop_as_many_at_once_as_the_plan_allows():
    loop_thread = threading.get_native_id()
    running, most = 0, 0
    lock = threading.Lock()
    release = threading.Event()

    def work() -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        release.wait(5)
        with lock:
            running -= 1
        return threading.get_native_id()

    tasks = [asyncio.ensure_future(slow_hash(work)) for _ in range(6)]
    await asyncio.sleep(0.2)  # the loop stays free while the hashes wait: this sleep returns
    release.set()
    threads = await asyncio.gather(*tasks)
    assert loop_thread not in threads
    assert most == HASHING.threads


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")
async def test_slow_hashes_run_at_a_lower_cpu_priority_than_the_event_loop():
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    assert await slow_hash(niceness) > os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
