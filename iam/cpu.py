"""The CPU this process may use, and how its argon2 threads share it with the event loop.

A container's CPU limit (Kubernetes `resources.limits.cpu`) is a cgroup quota: so many microseconds of CPU per
period (100 ms), for all the process's threads together. Thread priorities (nice) decide only between threads that
wait for the same CPU. Under a quota of one CPU, a hashing thread on one core and the event loop on the other spend
the quota in half a period, and then every thread of the process, the event loop too, waits out the rest of the
period: a sign-in burst raised the token introspection p99 from under 2 ms to 50 ms that way, and the kernel held
the process back for 7.4 s of an 8 s burst (bench/signin.py, `--cpu-limit 1`). A process that cannot give the
event loop a CPU of its own therefore keeps all its threads on one CPU: it never spends more than one CPU, so it
is not throttled for a limit of one, and on that CPU the event loop's priority decides.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
MOST_HASHING_THREADS = 2  # at most two argon2 runs at once (128 MiB): more cores serve more event loops instead

log = logging.getLogger("iam.cpu")


def cpu_limit(own_cgroups: str | None = None, root: Path = CGROUP_ROOT) -> float | None:
    """The CPUs per period this process's cgroup and its ancestors allow (the tightest), or None when unlimited.

    `own_cgroups` is /proc/self/cgroup's text: cgroup v2's `0::/path` (cpu.max), or v1's `N:cpu,cpuacct:/path`
    (cpu.cfs_quota_us over cpu.cfs_period_us)."""
    if own_cgroups is None:
        try:
            own_cgroups = Path("/proc/self/cgroup").read_text()
        except OSError:  # not Linux
            return None
    limits: list[float] = []
    for line in own_cgroups.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            limits += _limits(root if (root / "cgroup.controllers").exists() else root / "unified", path, _v2_limit)
        elif "cpu" in controllers.split(","):
            for mount in (root / name for name in ("cpu", "cpu,cpuacct", controllers) if (root / name).is_dir()):
                limits += _limits(mount, path, _v1_limit)
                break
    return min(limits, default=None)


def _limits(mount: Path, path: str, read: Callable[[Path], float | None]) -> list[float]:
    """The limits from the process's own cgroup up to the mount's root. Inside a container the mount is often the
    container's own cgroup while the path still names it from the host's root: then only the root is read."""
    here = mount / path.strip("/")
    if not here.is_dir():
        here = mount
    found = []
    while True:
        limit = read(here)
        if limit is not None:
            found.append(limit)
        if here == mount or mount not in here.parents:
            return found
        here = here.parent


def _v2_limit(directory: Path) -> float | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()
        return None if quota == "max" else _ratio(int(quota), int(period))
    except (OSError, ValueError):  # no such file, or not what the kernel writes: no limit read from it
        return None


def _v1_limit(directory: Path) -> float | None:
    try:
        return _ratio(int((directory / "cpu.cfs_quota_us").read_text()),
                      int((directory / "cpu.cfs_period_us").read_text()))
    except (OSError, ValueError):
        return None


def _ratio(quota: int, period: int) -> float | None:
    """CPUs per period; None for v1's -1 (no quota) or anything the kernel would not write."""
    return quota / period if quota > 0 and period > 0 else None


def cpus_allowed() -> int:
    """How many CPUs the process may run on (its affinity: a cpuset, `taskset`), whatever the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class HashingPlan:
    """How many argon2 runs at once, and whether they share the event loop's one CPU."""

    threads: int
    share_one_cpu: bool
    limit: float | None  # the CPU limit it was made for, for the start-up log line
    cpus: int


def hashing_plan(limit: float | None, cpus: int) -> HashingPlan:
    """Without a limit, the hashing threads run beside the event loop at a lower priority: on a busy machine the
    loop wins a shared core. Under a limit, they take only whole CPUs that the limit leaves beside the loop; when it
    leaves none (a limit below two CPUs), one thread shares the loop's CPU."""
    if limit is None or limit > cpus:  # a limit the allowed CPUs cannot reach does not bind; one they reach does
        return HashingPlan(min(MOST_HASHING_THREADS, cpus), False, limit, cpus)
    spare = int(limit) - 1  # whole CPUs beside the event loop's
    if spare >= 1:
        return HashingPlan(min(MOST_HASHING_THREADS, spare), False, limit, cpus)
    return HashingPlan(1, True, limit, cpus)


def share_one_cpu() -> int | None:
    """Keep every thread of the process, those it starts later too, on the CPU it runs on now; return that CPU.

    Threads inherit their creator's affinity, so the threads started later (the database drivers', the hashing
    threads) stay there too. Stays as it is, and returns None, where the system does not allow it."""
    try:
        cpu = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[36])  # field 39, `processor`
        if cpu not in os.sched_getaffinity(0):
            cpu = min(os.sched_getaffinity(0))
        for thread in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(thread), {cpu})
    except (AttributeError, OSError, ValueError, IndexError) as error:
        log.warning("the process could not keep its threads on one CPU (%s): a CPU limit below two CPUs may "
                    "throttle the event loop during sign-ins", type(error).__name__)
        return None
    return cpu


def describe(plan: HashingPlan, cpu: int | None) -> str:
    limit = "no CPU limit" if plan.limit is None else f"a CPU limit of {plan.limit:g}"
    where = f"sharing CPU {cpu} with the event loop" if cpu is not None else "beside the event loop"
    return f"argon2: {plan.threads} thread{'s' if plan.threads > 1 else ''} {where} ({limit}, {plan.cpus} CPUs allowed)"
