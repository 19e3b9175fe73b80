"""A real CPU limit, as a container's `resources.limits.cpu` sets it: a throw-away cgroup with a CPU quota.

Used by tests/test_cpu.py and bench/signin.py (`--cpu-limit`), through `serve(..., cgroup=...)` in tests/server.py.
It needs root and a writable cgroup file system (v1's cpu controller or v2's cpu.max)."""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

PERIOD_US = 100_000  # the kernel's default period, and Kubernetes'


class CgroupUnavailable(RuntimeError):
    pass


@contextlib.contextmanager
def cpu_limited(cpus: float, root: Path = Path("/sys/fs/cgroup")) -> Iterator[Path]:
    """A new cgroup allowing `cpus` CPUs per period; yields its directory, removed afterwards."""
    v1 = root / "cpu"
    mount = v1 if (v1 / "cpu.cfs_quota_us").exists() else root
    group = mount / f"iam-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    quota = round(cpus * PERIOD_US)
    try:
        group.mkdir()
        if mount is v1:
            (group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
    except OSError as error:
        with contextlib.suppress(OSError):
            group.rmdir()
        raise CgroupUnavailable(f"no writable cgroup CPU controller under {root} ({error})") from error
    try:
        yield group
    finally:
        for pid in (group / "cgroup.procs").read_text().split():  # a process still there: back to the root
            with contextlib.suppress(OSError):
                (mount / "cgroup.procs").write_text(pid)
        group.rmdir()


def inside(group: Path, command: list[str]) -> list[str]:
    """`command`, started inside `group` from its first instruction: a shell joins the group, then becomes it."""
    return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group), *command]


def throttled_us(group: Path) -> int:
    """How long the kernel has held the group's threads back for its quota, in microseconds."""
    stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
    return int(stat["throttled_time"]) // 1000 if "throttled_time" in stat else int(stat["throttled_usec"])
