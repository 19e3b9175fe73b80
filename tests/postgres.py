"""A throw-away PostgreSQL cluster for the test suite: initdb in a temp dir, started on a free port.

`IAM_TEST_POSTGRES_URL` (e.g. postgresql://postgres@127.0.0.1:5432) uses an existing server instead.
PostgreSQL refuses to run as root, so as root the cluster runs as the `postgres` user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if not found:
        raise RuntimeError(f"PostgreSQL's {name} is not installed (Debian: apt-get install postgresql)")
    return found


class Cluster:
    """A running throw-away cluster an operations test can restart, or freeze as a hung host would be."""

    def __init__(self, workdir: Path, port: int, prefix: list[str]) -> None:
        self.workdir, self.data, self.port, self._prefix = workdir, workdir / "data", port, prefix
        self.url = f"postgresql://postgres@127.0.0.1:{port}"

    def pg_ctl(self, *args: str) -> None:
        options = (
            f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        subprocess.run([*self._prefix, _bin("pg_ctl"), "-D", str(self.data), "-o", options,
                        "-l", str(self.workdir / "log"), *args], check=True, capture_output=True, text=True)

    def restart(self) -> None:
        """`pg_ctl restart` (fast mode: every connection is closed), back once it accepts connections."""
        self.pg_ctl("-m", "fast", "-w", "restart")

    def processes(self) -> list[int]:
        """The postmaster and every process it started (backends, background workers)."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        children = subprocess.run(["pgrep", "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        return [postmaster, *map(int, children)]

    @contextmanager
    def frozen(self):
        """SIGSTOP the whole cluster (a hung database host: connections stay open, nothing answers)."""
        stopped = self.processes()
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        try:
            yield
        finally:
            for pid in stopped:
                os.kill(pid, signal.SIGCONT)


# A run creates thousands of databases (gigabytes of small files): minutes to create and delete on a busy disk,
# seconds in memory. Durability is off anyway, and mkdtemp makes a private (0700) directory there.
SHM = "/dev/shm"  # noqa: S108


def _memory_backed_dir() -> str | None:
    return SHM if os.access(SHM, os.W_OK) else None


@contextmanager
def dedicated_cluster():
    """A cluster of its own (never IAM_TEST_POSTGRES_URL's): for tests that restart or freeze it."""
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    workdir = Path(tempfile.mkdtemp(prefix="iam-pg-", dir=_memory_backed_dir()))
    if as_root:
        shutil.chown(workdir, "postgres", "postgres")
    server = Cluster(workdir, free_port(), prefix)
    try:
        subprocess.run([*prefix, _bin("initdb"), "-D", str(server.data), "-U", "postgres", "--auth=trust", "-E",
                        "UTF8", "--no-sync"], check=True, capture_output=True, text=True)
        server.pg_ctl("-w", "start")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {exc.stderr or exc.stdout}") from None
    try:
        yield server
    finally:
        with contextlib.suppress(Exception):
            for pid in server.processes():
                os.kill(pid, signal.SIGCONT)
        subprocess.run([*prefix, _bin("pg_ctl"), "-D", str(server.data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def cluster():
    """Yield a server URL like postgresql://postgres@127.0.0.1:PORT; the cluster is removed afterwards."""
    if os.environ.get("IAM_TEST_POSTGRES_URL"):
        yield os.environ["IAM_TEST_POSTGRES_URL"].rstrip("/")
        return
    with dedicated_cluster() as server:
        yield server.url
