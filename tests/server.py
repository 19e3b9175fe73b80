"""Run the real `iam` command as a process, as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml

from tests.cpu_limit import inside
from tests.postgres import free_port


def write_config(directory: Path, **settings) -> Path:
    path = directory / "iam.yaml"
    path.write_text(yaml.safe_dump(settings))
    return path


def iam(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, input: str | None = None,
        timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "iam.cli", *args],
        env={**os.environ, **(env or {})},
        cwd=cwd,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@contextmanager
def serve(env: dict[str, str], cwd: Path, wait_for: str = "/health/ready", ready_timeout: float = 30,
          port: int | None = None, cgroup: Path | None = None):
    """Start `iam serve` (on `port`, or a free one); yield its base URL and process once `wait_for` answers 200.

    With `cgroup` (tests/cpu_limit.py) the process starts inside that cgroup, as in a container with a CPU limit."""
    port = port or free_port()
    log = open(cwd / "server.log", "w+")  # noqa: SIM115
    command = [sys.executable, "-m", "iam.cli", "serve", "--port", str(port)]
    if cgroup is not None:
        command = inside(cgroup, command)
    process = subprocess.Popen(
        command,
        # No drain delay when the test terminates the server, unless the test sets one.
        env={**os.environ, "IAM_DRAIN_DELAY": "0", **env},
        cwd=cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"iam serve exited with {process.returncode}: {log.read()}")
            try:
                if httpx.get(f"{base}{wait_for}", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"iam serve did not answer 200 at {wait_for}")
            time.sleep(0.1)
        yield base, process
    finally:
        terminate(process, 15)
        log.close()


def terminate(process: subprocess.Popen, timeout: float = 10) -> None:
    """End a process a test started: SIGTERM, then SIGKILL if it has not exited within `timeout` seconds."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def token_role_env(directory: Path, **settings) -> dict[str, str]:
    """Environment for a token-role process on SQLite with the test clients (its peers are never called)."""
    from tests.conftest import ISSUER, client_config

    config = write_config(directory, **{"issuer": ISSUER, "keys": {"dir": str(directory / "keys")},
                                        "clients": client_config(), "purge_interval": 0, **settings})
    unused = f"http://127.0.0.1:{free_port()}"
    return {
        "IAM_CONFIG": str(config),
        "SERVICE_ROLE": "token",
        "IAM_TOKEN_DATABASE_URL": f"sqlite+aiosqlite:///{directory}/token.db",
        **{var: unused for var in ("IAM_AUTHN_URL", "IAM_TOKEN_URL", "IAM_USERS_URL")},
    }
