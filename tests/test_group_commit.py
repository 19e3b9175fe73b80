"""Group commit of issuance (iam.token.store, iam.store.SqliteDirect), and SQLite reads on the event loop.

A response may be sent only after its row is committed, and one failing statement in a batch fails only its
own caller: nothing it wrote is stored, everything else in the batch is.
"""

import asyncio
import sqlite3

import pytest

from iam.store import SqliteDirect
from tests.test_introspection import introspect
from tests.test_token_endpoint import get_token


@pytest.fixture
async def direct(tmp_path):
    path = str(tmp_path / "direct.db")
    with sqlite3.connect(path) as setup:
        setup.execute("CREATE TABLE t (k INTEGER PRIMARY KEY, v TEXT NOT NULL)")
    store = SqliteDirect(path)
    yield store
    await store.close()


def rows(direct: SqliteDirect) -> dict[int, str]:
    with sqlite3.connect(direct.path) as other:  # another connection: what is committed, not what is cached
        return dict(other.execute("SELECT k, v FROM t").fetchall())


async def test_every_write_is_committed_before_it_returns(direct):
    async def write(k: int) -> int:
        await direct.write("INSERT INTO t (k, v) VALUES (?, ?)", (k, f"v{k}"))
        assert rows(direct)[k] == f"v{k}"  # committed, and visible to any other connection, when it returns
        return k

    assert sorted(await asyncio.gather(*(write(k) for k in range(200)))) == list(range(200))
    assert direct.read_one("SELECT v FROM t WHERE k = ?", (7,)) == ("v7",)


async def test_a_failing_statement_fails_alone_and_stores_nothing(direct):
    await direct.write("INSERT INTO t (k, v) VALUES (?, ?)", (1, "first"))
    outcomes = await asyncio.gather(
        direct.write("INSERT INTO t (k, v) VALUES (?, ?)", (2, "two")),
        direct.write("INSERT INTO t (k, v) VALUES (?, ?)", (1, "duplicate")),  # same key: refused
        direct.write("INSERT INTO t (k, v) VALUES (?, ?)", (3, None)),  # NOT NULL: refused
        direct.write("INSERT INTO t (k, v) VALUES (?, ?)", (4, "four")),
        return_exceptions=True)
    assert outcomes[0] is None and outcomes[3] is None
    assert isinstance(outcomes[1], sqlite3.IntegrityError) and isinstance(outcomes[2], sqlite3.IntegrityError)
    assert rows(direct) == {1: "first", 2: "two", 4: "four"}


async def test_concurrent_issuance_every_200_has_its_row(client, app):
    responses = await asyncio.gather(*(get_token(client) for _ in range(60)))
    tokens = {body["access_token"] for body in responses}
    assert len(tokens) == 60
    app.state.iam.token.hot_cache.clear()  # a store lookup for each, not the cache
    for token in tokens:
        assert (await introspect(client, token)).json()["active"] is True


async def test_a_batch_with_a_failing_row_stores_the_others(app):
    """Group commit on either store: one batch, one row refused (its digest is taken), the rest stored."""
    from sqlalchemy.exc import IntegrityError

    from iam.token.store import AccessTokenRow

    store = app.state.iam.token.store

    def row(n: int, digest: bytes | None = None) -> AccessTokenRow:
        return AccessTokenRow(digest or n.to_bytes(32, "big"), "svc-basic", f"s{n}", 2**31 - 1, False, f"jwt{n}", None)

    await store.add_access_token(row(1))
    outcomes = await asyncio.gather(*(store.add_access_token(row(n)) for n in (2, 3, 4)),
                                    store.add_access_token(row(5, digest=row(1).digest)), return_exceptions=True)
    assert outcomes[:3] == [None, None, None] and isinstance(outcomes[3], IntegrityError)
    for n in (1, 2, 3, 4):
        assert await store.find_access_token(row(n).digest) == row(n)  # the first row of that digest is kept


async def test_concurrent_lookups_each_get_their_own_row(app):
    """Lookups that arrive together share one SELECT on PostgreSQL (iam.token.store.Batches): each still gets the
    row of its own digest, an unknown digest None, and a digest asked twice the same row twice."""
    from iam.token.store import AccessTokenRow

    store = app.state.iam.token.store

    def row(n: int) -> AccessTokenRow:
        return AccessTokenRow(n.to_bytes(32, "big"), "svc-basic", f"s{n}", 2**31 - 1, n % 3 == 0, f"jwt{n}", None)

    await asyncio.gather(*(store.add_access_token(row(n)) for n in range(1, 31)))
    statements = []
    on_driver = store._on_driver

    async def counted(statement, call):
        statements.append(statement)
        return await on_driver(statement, call)

    store._on_driver = counted
    asked = [*range(1, 41), 5, 5, 17]  # 31 to 40 were never stored
    found = await asyncio.gather(*(store.find_access_token(n.to_bytes(32, "big")) for n in asked))
    assert found == [row(n) if n <= 30 else None for n in asked]
    if store._postgresql:
        assert 1 <= len(statements) < len(asked)  # shared: the first alone, the rest together


async def test_a_slow_lookup_does_not_hold_up_the_others():
    """Up to `concurrency` batches run at once: one stalled statement (a cold page, a lock) leaves the next calls free
    to go; and a call made as a batch ends is never left waiting."""
    from iam.token.store import Batches

    release = asyncio.Event()

    async def run(items: list[str]) -> list[str]:
        if "slow" in items:
            await release.wait()
        return [item.upper() for item in items]

    batches: Batches[str, str] = Batches(run, concurrency=2)
    slow = asyncio.ensure_future(batches.submit("slow"))
    await asyncio.sleep(0)
    assert await asyncio.wait_for(batches.submit("fast"), 1) == "FAST"  # not behind the stalled batch

    async def calls() -> None:
        for n in range(50):  # each call comes in the very loop turn its previous batch ends
            assert await batches.submit(f"n{n}") == f"N{n}"

    await asyncio.wait_for(calls(), 2)
    release.set()
    assert await slow == "SLOW"
    await batches.close()
