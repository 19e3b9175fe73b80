"""The argon2 threads follow the CPU limit of the process's container (iam/cpu.py).

Under a cgroup CPU quota the kernel holds back every thread of the process once the quota is spent, whatever their
priorities: a hashing thread beside the event loop on another core spends a one-CPU quota in half a period. So
below two CPUs the process keeps all its threads on one CPU, where the event loop's priority decides."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from pathlib import Path

import httpx
import pytest

from iam.cpu import HashingPlan, cpu_limit, hashing_plan
from tests.conftest import SECRETS
from tests.cpu_limit import CgroupUnavailable, cpu_limited
from tests.server import serve, token_role_env

# -- reading the limit ----------------------------------------------------------------------------------------


def _write(directory: Path, **files: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text)


def test_cgroup_v2_limit_is_the_tightest_of_the_process_cgroup_and_its_ancestors(tmp_path):
    _write(tmp_path, cgroup_controllers="cpu memory")
    _write(tmp_path / "kubepods", cpu_max="max 100000\n")
    _write(tmp_path / "kubepods" / "pod1", cpu_max="150000 100000\n")
    _write(tmp_path / "kubepods" / "pod1" / "app", cpu_max="max 100000\n")
    assert cpu_limit("0::/kubepods/pod1/app\n", tmp_path) == 1.5
    _write(tmp_path / "kubepods" / "pod1" / "app", cpu_max="50000 100000\n")
    assert cpu_limit("0::/kubepods/pod1/app\n", tmp_path) == 0.5


def test_cgroup_v1_quota_over_period_and_no_quota_is_no_limit(tmp_path):
    v1 = "12:memory:/x\n4:cpu,cpuacct:/kubepods/pod2\n1:name=systemd:/x\n0::/x\n"
    _write(tmp_path / "cpu", cpu_cfs_quota_us="-1\n", cpu_cfs_period_us="100000\n")
    _write(tmp_path / "cpu" / "kubepods" / "pod2", cpu_cfs_quota_us="200000\n", cpu_cfs_period_us="100000\n")
    assert cpu_limit(v1, tmp_path) == 2.0
    _write(tmp_path / "cpu" / "kubepods" / "pod2", cpu_cfs_quota_us="-1\n", cpu_cfs_period_us="100000\n")
    assert cpu_limit(v1, tmp_path) is None


def test_inside_a_container_the_mount_is_its_own_cgroup_though_the_path_names_the_hosts(tmp_path):
    # cgroup v1 without a cgroup namespace: /proc/self/cgroup names the host's path, the mount is the container's
    _write(tmp_path / "cpu", cpu_cfs_quota_us="100000\n", cpu_cfs_period_us="100000\n")
    assert cpu_limit("3:cpu:/docker/0123abcd\n", tmp_path) == 1.0


def test_no_cgroup_file_system_or_an_unreadable_one_is_no_limit(tmp_path):
    assert cpu_limit("0::/\n", tmp_path) is None
    for garbage in ("garbage\n", "x 100000\n", "100000 0\n", "100000 y\n"):  # never a crash at start
        _write(tmp_path, cgroup_controllers="cpu", cpu_max=garbage)
        assert cpu_limit("0::/\n", tmp_path) is None


# -- the plan ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("limit", "cpus", "plan"), [
    (None, 2, (2, False)),  # no limit: two threads beside the loop, at a lower priority (nice)
    (None, 1, (1, False)),
    (8, 2, (2, False)),     # a limit the allowed CPUs cannot reach does not bind
    (2, 2, (1, False)),     # one they can reach does: two busy CPUs spend a two-CPU quota
    (3, 8, (2, False)),     # two whole CPUs beside the loop's
    (2.5, 8, (1, False)),
    (2, 8, (1, False)),
    (1.5, 8, (1, True)),    # none beside the loop's: share its CPU
    (1, 2, (1, True)),
    (0.5, 4, (1, True)),
])
def test_hashing_threads_take_only_whole_cpus_the_limit_leaves_beside_the_event_loop(limit, cpus, plan):
    assert hashing_plan(limit, cpus) == HashingPlan(*plan, limit, cpus)


# -- a real `iam serve` under a real CPU limit -------------------------------------------------------------------

linux_with_two_cpus = pytest.mark.skipif(
    not sys.platform.startswith("linux") or len(os.sched_getaffinity(0)) < 2, reason="needs Linux and two CPUs")


def _threads(pid: int) -> dict[int, tuple[int, set[int]]]:
    """Each thread of the process: its nice value and the CPUs it may run on (Cpus_allowed_list, "0-3,6")."""
    found = {}
    for tid in map(int, os.listdir(f"/proc/{pid}/task")):
        task = Path(f"/proc/{pid}/task/{tid}")
        listed = next(line.split(":")[1].strip() for line in (task / "status").read_text().splitlines()
                      if line.startswith("Cpus_allowed_list"))
        allowed = set()
        for part in listed.split(","):
            first, _, last = part.partition("-")
            allowed |= set(range(int(first), int(last or first) + 1))
        nice = int((task / "stat").read_text().rsplit(")", 1)[1].split()[16])  # field 19
        found[tid] = (nice, allowed)
    return found


def _hashing_threads(threads: dict[int, tuple[int, set[int]]]) -> int:
    """The hashing threads are the process's only ones at a lower priority (nice +10, iam/security.py)."""
    return sum(nice > 0 for nice, _ in threads.values())


async def _hash_concurrently(base: str, times: int) -> None:
    """Client authentications with an argon2-hashed secret, at once: they run on the hashing threads."""
    async with httpx.AsyncClient(timeout=30) as http:
        answers = await asyncio.gather(*(http.post(
            f"{base}/oauth/v2/token", data={"grant_type": "client_credentials"},
            auth=("gateway", SECRETS["gateway"])) for _ in range(times)))
    assert [answer.status_code for answer in answers] == [200] * times


@pytest.fixture
def cgroup_of():
    """cgroup_of(cpus): a throw-away cgroup with that CPU limit, or a skip where cgroups are not writable."""
    with contextlib.ExitStack() as stack:
        def make(cpus: float) -> Path:
            try:
                return stack.enter_context(cpu_limited(cpus))
            except CgroupUnavailable as error:
                pytest.skip(str(error))
        yield make


def _threads_after_hashing(tmp_path: Path, cgroup: Path | None) -> dict[int, tuple[int, set[int]]]:
    """A real token-role server (in `cgroup`, if given) after four concurrent argon2 verifications: its threads."""
    with serve(token_role_env(tmp_path), tmp_path, cgroup=cgroup) as (base, process):
        asyncio.run(_hash_concurrently(base, 4))
        return _threads(process.pid)


@pytest.mark.slow
@linux_with_two_cpus
def test_under_a_limit_of_one_cpu_every_thread_of_the_server_shares_one_cpu(tmp_path, cgroup_of):
    threads = _threads_after_hashing(tmp_path, cgroup_of(1))
    cpus = {frozenset(allowed) for _, allowed in threads.values()}
    # the main thread, those started before the limit was read (the drivers') and after (the hashing thread)
    assert len(cpus) == 1 and len(next(iter(cpus))) == 1, threads
    assert len(threads) > 2
    assert _hashing_threads(threads) == 1  # one argon2 run at a time


@pytest.mark.slow
@linux_with_two_cpus
def test_under_a_limit_of_two_cpus_one_hashing_thread_runs_beside_the_event_loop(tmp_path, cgroup_of):
    threads = _threads_after_hashing(tmp_path, cgroup_of(2))
    assert all(allowed == os.sched_getaffinity(0) for _, allowed in threads.values()), threads  # not confined
    assert _hashing_threads(threads) == 1


@pytest.mark.slow
@linux_with_two_cpus
def test_without_a_limit_two_hashing_threads_run_on_every_cpu_allowed(tmp_path):
    threads = _threads_after_hashing(tmp_path, None)
    assert all(allowed == os.sched_getaffinity(0) for _, allowed in threads.values()), threads
    assert _hashing_threads(threads) == 2
