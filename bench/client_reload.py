"""What a full reload of the stored clients costs: the token role in process (SQLite), `--clients` stored clients
seeded in bulk, then `ClientSync.resync()` (what a listener reconnect, or on SQLite another process's change,
runs) timed once after the seed and `--rounds` times with nothing changed, then once after one client changed.

    python bench/client_reload.py                    # 10,000 clients, 3 rounds
    python bench/client_reload.py --clients 50000

The reload runs on the event loop: its wall time is how long every request of that process waits meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import insert, update  # noqa: E402

from iam.app import create_app  # noqa: E402
from iam.token.store import clients as clients_table  # noqa: E402
from tests.conftest import make_settings  # noqa: E402  (the suite's settings: its clients and keys)

METADATA = json.dumps({"redirect_uris": ["https://app.example/cb"], "scope": "openid profile email",
                       "grant_types": ["authorization_code", "refresh_token"], "client_name": "An application"})


async def timed(label: str, reload) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    await reload()
    result = {"reload": label, "wall_ms": round(1000 * (time.perf_counter() - wall)),
              "cpu_ms": round(1000 * (time.process_time() - cpu))}
    print(f"{label:<32}{result['wall_ms']:>8} ms wall{result['cpu_ms']:>8} ms CPU")
    return result


async def main(args: argparse.Namespace) -> None:
    directory = Path(tempfile.mkdtemp(prefix="iam-bench-reload-"))
    urls = {name: f"sqlite+aiosqlite:///{directory}/{name}.db" for name in ("authn", "token", "users")}
    app = create_app(make_settings(directory, urls))
    async with app.router.lifespan_context(app):
        token, engine = app.state.iam.token, app.state.iam.stores["token"].engine
        now = int(time.time())
        async with engine.begin() as conn:
            await conn.execute(insert(clients_table), [
                {"client_id": f"bulk-{i:06d}", "metadata": METADATA, "enabled": True, "version": 1,
                 "created_at": now, "updated_at": now, "secret_digest": b"\0" * 32} for i in range(args.clients)])
        results = [await timed(f"{args.clients:,} clients, first", token.client_sync.resync)]
        for _ in range(args.rounds):
            results.append(await timed("nothing changed", token.client_sync.resync))
        async with engine.begin() as conn:
            await conn.execute(update(clients_table).where(clients_table.c.client_id == "bulk-000001")
                               .values(version=2, metadata=json.dumps({**json.loads(METADATA), "client_name": "B"})))
        results.append(await timed("one client changed", token.client_sync.resync))
        assert token.clients.get("bulk-000001").client_name == "B"
    print(json.dumps({"clients": args.clients, "results": results}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
