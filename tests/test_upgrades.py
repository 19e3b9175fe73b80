"""Rolling upgrades (expand/contract): an instance is ready with its store at its own head or at a later
revision declared compatible with it; `iam migrate --check` says what would run and whether the running code
stays compatible."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml
from sqlalchemy import insert, text, update

from iam.store import Store, StoreError, schema_compatibility
from tests.conftest import basic, create_database
from tests.server import iam, serve, token_role_env, write_config

FORM = {"Content-Type": "application/x-www-form-urlencoded"}

LATER = "token_9999"  # a revision of a later release, which this code's tree does not have


async def _set_revision(store: Store, revision: str) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = :revision"), {"revision": revision})


async def test_ready_at_its_head_or_at_a_later_revision_declared_compatible(store_urls):
    store = Store("token", store_urls["token"])
    try:
        await store.migrate()
        await store.check()
        assert await store.plan() == (store.head, [], True)

        await _set_revision(store, LATER)
        async with store.engine.begin() as conn:
            await conn.execute(insert(schema_compatibility).values(revision=LATER,
                                                                   compatible_with=f"token_0001,{store.head}"))
        await store.check()  # the later release declared this code's head compatible
        assert await store.plan() == (LATER, [], True)

        async with store.engine.begin() as conn:
            await conn.execute(update(schema_compatibility).where(schema_compatibility.c.revision == LATER)
                               .values(compatible_with="token_0001"))
        with pytest.raises(StoreError, match="not declared compatible"):
            await store.check()
        assert await store.plan() == (LATER, [], False)

        previous = store.script.get_revision(store.head).down_revision
        await _set_revision(store, previous)  # behind: this code needs the migration first
        with pytest.raises(StoreError, match="run `iam migrate`"):
            await store.check()
        current, pending, _ = await store.plan()
        assert (current, pending) == (previous, [store.head])
    finally:
        await store.close()


async def test_migrate_records_what_the_head_is_compatible_with(store_urls):
    store = Store("token", store_urls["token"])
    try:
        await store.migrate()
        await store.migrate()  # idempotent
        async with store.engine.connect() as conn:
            rows = (await conn.execute(schema_compatibility.select())).all()
        assert [(row.revision, row.compatible_with) for row in rows] == [
            (store.head, ",".join(store.declared_compatible(store.head)))]
    finally:
        await store.close()


def test_migrate_check_says_what_would_run_and_changes_nothing(tmp_path):
    config = write_config(tmp_path, issuer="https://iam.test")
    env = {"IAM_CONFIG": str(config), "SERVICE_ROLE": "token",
           "IAM_TOKEN_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/token.db",
           **{var: "http://127.0.0.1:1" for var in ("IAM_AUTHN_URL", "IAM_USERS_URL")}}
    fresh = iam("migrate", "--check", env=env, cwd=tmp_path)
    assert fresh.returncode == 0, fresh.stderr
    assert "at nothing; would run token_0001, token_0002" in fresh.stdout
    again = iam("migrate", "--check", env=env, cwd=tmp_path)
    assert "at nothing; would run token_0001" in again.stdout  # the check applied nothing
    assert iam("migrate", env=env, cwd=tmp_path).returncode == 0
    current = iam("migrate", "--check", env=env, cwd=tmp_path)
    assert current.returncode == 0 and "nothing to run" in current.stdout and "stays compatible" in current.stdout


# -- a rolling upgrade for real: the previous release's code and this one against one PostgreSQL store -------
ROOT = Path(__file__).resolve().parent.parent


def _previous_release(directory: Path) -> Path | None:
    """The code as it was before the newest token migration, from the repository's history."""
    newest = sorted((ROOT / "migrations" / "token").glob("0*.py"))[-1].relative_to(ROOT)
    git = ["git", "-C", str(ROOT)]
    if subprocess.run([*git, "rev-parse", "--git-dir"], capture_output=True).returncode != 0:
        return None
    added = subprocess.run([*git, "log", "--diff-filter=A", "--format=%H", "-1", "--", str(newest)],
                           capture_output=True, text=True).stdout.strip()
    commit = f"{added}^" if added else "HEAD"  # not committed yet: the last commit is the previous release
    archive = subprocess.run([*git, "archive", "--format=tar", commit], capture_output=True)
    if archive.returncode != 0:
        return None
    directory.mkdir()
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)
    return directory


def _config_for(code: Path, config: Path, directory: Path) -> Path:
    """The config an older release runs with during a rollout (each revision has its own ConfigMap): the same,
    less the client keys that release does not know yet and would refuse (a client's keys are checked)."""
    known = subprocess.run([sys.executable, "-c", "from iam.config import ClientConfig; print(*ClientConfig.model_fields)"],
                           env={**os.environ, "PYTHONPATH": str(code)}, cwd=code, capture_output=True, text=True,
                           check=True)
    settings = yaml.safe_load(config.read_text())
    settings["clients"] = [{key: value for key, value in client.items() if key in known.stdout.split()}
                           for client in settings["clients"]]
    directory.mkdir()
    return write_config(directory, **settings)


class Replica:
    def __init__(self, code: Path, env: dict[str, str], directory: Path) -> None:
        self.code, self.env, self.directory = code, {**env, "PYTHONPATH": str(code)}, directory
        self.directory.mkdir()
        self._serving = None
        self.process: subprocess.Popen | None = None  # None until started, or when it could not start

    def command(self, *args: str) -> subprocess.CompletedProcess:
        return iam(*args, env=self.env, cwd=self.code)

    def start(self) -> str:
        self._serving = serve(self.env, self.directory)
        self.base, self.process = self._serving.__enter__()
        return self.base

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        status = self.process.wait(timeout=30)
        self._serving.__exit__(None, None, None)
        return status


def test_a_rolling_upgrade_fails_no_request(postgres_server, tmp_path):
    previous = _previous_release(tmp_path / "previous")
    if previous is None:
        pytest.skip("needs the repository's history (git)")
    host = postgres_server.split("://", 1)[1]
    database = asyncio.run(create_database(postgres_server))
    env = {**token_role_env(tmp_path), "IAM_TOKEN_DATABASE_URL": f"postgresql+asyncpg://{host}/{database}",
           "IAM_MIGRATE_ON_START": "false", "IAM_DRAIN_DELAY": "1"}
    old_env = {**env, "IAM_CONFIG": str(_config_for(previous, Path(env["IAM_CONFIG"]), tmp_path / "old-config"))}
    old = [Replica(previous, old_env, tmp_path / f"old{i}") for i in range(2)]
    new = [Replica(ROOT, env, tmp_path / f"new{i}") for i in range(2)]
    assert old[0].command("migrate").returncode == 0
    rotation = [replica.start() for replica in old]  # what a Service would send traffic to

    failures: list[object] = []
    answered = {"issued": 0, "introspected": 0}
    stop = threading.Event()

    def load(seed: int) -> None:
        rng = random.Random(seed)
        while not stop.is_set():
            issuer, checker = rng.choice(rotation), rng.choice(rotation)  # often two versions at once
            try:
                issued = httpx.post(f"{issuer}/oauth/v2/token", headers={**basic("svc-basic"), **FORM},
                                    data={"grant_type": "client_credentials"}, timeout=30)
                if issued.status_code != 200:
                    failures.append((issuer, issued.status_code, issued.text))
                    continue
                answered["issued"] += 1
                found = httpx.post(f"{checker}/oauth/v2/introspect", headers={**basic("svc-basic"), **FORM},
                                   data={"token": issued.json()["access_token"]}, timeout=30)
                if found.status_code != 200 or found.json().get("active") is not True:
                    failures.append((checker, found.status_code, found.text))
                answered["introspected"] += 1
            except httpx.TransportError as exc:
                failures.append((issuer, exc))

    threads = [threading.Thread(target=load, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    try:
        checked = new[0].command("migrate", "--check")
        assert checked.returncode == 0 and "stays compatible" in checked.stdout, checked.stdout + checked.stderr
        assert new[0].command("migrate").returncode == 0  # under load, the old replicas serving
        for replica in old:  # the old code is still ready on the expanded schema
            assert httpx.get(f"{replica.base}/health/ready", timeout=10).status_code == 200
        for old_replica, new_replica in zip(old, new, strict=True):  # one by one
            rotation.append(new_replica.start())
            rotation.remove(old_replica.base)  # out of the Service's endpoints, then terminated
            assert old_replica.stop() == 0
        time.sleep(1)  # the new replicas alone, a moment
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        for replica in old + new:
            if replica.process is not None and replica.process.poll() is None:
                replica.stop()
    assert failures == [], failures[:5]
    assert answered["issued"] > 20 and answered["introspected"] > 20
