"""Rolling upgrades (expand/contract): an instance is ready with its store at its own head or at a later
revision declared compatible with it; `iam migrate --check` says what would run and whether the running code
stays compatible."""

from __future__ import annotations

import pytest
from sqlalchemy import insert, text, update

from iam.store import Store, StoreError, schema_compatibility
from tests.server import iam, write_config

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
