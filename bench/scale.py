"""Introspection on a cache miss and issuance with 10 million stored tokens, beside 10 thousand, in one run.

`python bench/scale.py` (from the repository root; `--help`, bench/README.md). One throw-away PostgreSQL 15
cluster holds two token stores: `iam_token_small`, seeded with `--small` rows, and `iam_token_large`, seeded with
`--large` rows, in bulk (`INSERT ... SELECT ... FROM generate_series`, not through the API), each row a live
token with a real JWT of the shape iam issues. One `iam serve` (role token, hot cache off: every check is a store
lookup) runs on each. Then, alternating small and large for `--rounds` rounds, the same scenarios as
bench/run.py: wrk at the maximum rate, then bench/loadgen.py paced at half of it for p50/p99:

- introspect_miss: `POST /oauth/v2/introspect` of a seeded token picked at random per request (all N live)
- client_credentials: `POST /oauth/v2/token`, one more row in the large or the small table

Prints each run and the large / small ratio of the means; writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.loadgen import seeded_token  # noqa: E402
from bench.run import (  # noqa: E402
    CLIENT_ID,
    PG_BIN,
    BenchError,
    Scenario,
    bench_scenario,
    get_token,
    log,
    start_postgres,
    start_server,
    tail,
)

STORES = {"small": "iam_token_small", "large": "iam_token_large"}
BATCH = 1_000_000  # rows per INSERT: progress shows, and no transaction holds 10 million rows' WAL at once
# The row a seeded token gets: its digest is SHA-256 of the 43-character token bench/loadgen.py and bench/wrk.lua
# send (`scale` and 38 digits), the JWT is a real one this server signed (so introspection decodes a real JWT).
SEED = """\
INSERT INTO access_tokens (digest, client_id, subject, expires_at, revoked, jwt, grant_id)
SELECT sha256(convert_to('scale' || lpad(i::text, 38, '0'), 'UTF8')), '{client}', 'bench-subject-' || (i % 1000),
       {expires}, false, (SELECT jwt FROM access_tokens ORDER BY expires_at DESC LIMIT 1), NULL
FROM generate_series({first}, {last}) AS i"""


def psql(port: int, database: str, sql: str) -> str:
    command = [PG_BIN / "psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", database,
               "-v", "ON_ERROR_STOP=1", "-Atc", sql]
    done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise BenchError(f"psql failed: {done.stderr}")
    return done.stdout.strip()


def seed(port: int, database: str, rows: int) -> None:
    """Fill the store's access_tokens with `rows` live tokens, then VACUUM ANALYZE it as autovacuum would."""
    started = time.monotonic()
    expires = int(time.time()) + 7 * 86400
    for first in range(1, rows + 1, BATCH):
        last = min(rows, first + BATCH - 1)
        psql(port, database, SEED.format(client=CLIENT_ID, expires=expires, first=first, last=last))
        log(f"{database}: {last:,} of {rows:,} rows seeded ({time.monotonic() - started:.0f} s)")
    psql(port, database, "VACUUM ANALYZE access_tokens")
    size = psql(port, database, "SELECT pg_size_pretty(pg_total_relation_size('access_tokens'))")
    log(f"{database}: {rows:,} rows, {size} with indexes, in {time.monotonic() - started:.0f} s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--small", type=int, default=10_000, help="rows in the small store (default 10,000)")
    add("--large", type=int, default=10_000_000, help="rows in the large store (default 10,000,000)")
    add("--rounds", type=int, default=2, help="small/large alternations (default 2)")
    add("--duration", type=int, default=8, help="seconds per measured run (default 8)")
    add("--connections", type=int, default=32, help="concurrent connections (default 32)")
    add("--shared-buffers", default="1GB", help="PostgreSQL shared_buffers (default 1GB)")
    args = parser.parse_args()
    args.threads, args.warmup, args.load_ratio = 1, 1, 0.5  # as bench/run.py's defaults
    args.wrk = shutil.which("wrk")
    if not args.wrk:
        parser.error("wrk is not installed (Debian: apt-get install -y wrk)")
    return args


def scenarios(basic: str, rows: int) -> list[Scenario]:
    form = {"Content-Type": "application/x-www-form-urlencoded", "Authorization": basic}
    return [Scenario("introspect_miss", "POST", "/oauth/v2/introspect", form, "token={token}", random_tokens=rows),
            Scenario("client_credentials", "POST", "/oauth/v2/token", form, "grant_type=client_credentials")]


def main() -> None:
    args = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="iam-bench-scale-"))
    runs: dict[str, dict[str, list[dict]]] = {"small": {}, "large": {}}
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        if os.geteuid() == 0:
            shutil.chown(tmp, "postgres", "postgres")  # the cluster lives inside and runs as postgres
        port = start_postgres(tmp, stack, f"-c shared_buffers={args.shared_buffers}")
        db = f"postgresql+asyncpg://postgres@127.0.0.1:{port}"
        secret = secrets.token_urlsafe(24)
        basic = "Basic " + base64.b64encode(f"{CLIENT_ID}:{secret}".encode()).decode()
        bases = {}
        try:
            for size, database in STORES.items():
                psql(port, "postgres", f"CREATE DATABASE {database}")
                work = tmp / size
                work.mkdir()
                bases[size] = start_server(work, db, secret, stack, cache_seconds=0, database=database)
                get_token(bases[size], basic)  # one real row: the JWT the seeded rows copy
                rows = args.small if size == "small" else args.large
                seed(port, database, rows)
                check = httpx.post(f"{bases[size]}/oauth/v2/introspect", data={"token": seeded_token(rows)},
                                   headers={"Authorization": basic}, timeout=10)
                if check.status_code != 200 or check.json().get("active") is not True:
                    raise BenchError(f"a seeded token is not active: {check.status_code} {check.text[:300]}")
            for round_ in range(args.rounds):
                for size in ("small", "large"):
                    for scenario in scenarios(basic, args.small if size == "small" else args.large):
                        log(f"round {round_ + 1}, {size}: {scenario.name}")
                        result = bench_scenario(bases[size], scenario, args, port)
                        runs[size].setdefault(scenario.name, []).append(result)
            counts = {size: psql(port, database, "SELECT count(*) FROM access_tokens")
                      for size, database in STORES.items()}
        except BenchError as exc:
            log(f"error: {exc}")
            for size in STORES:
                if (tmp / size / "server.log").exists():
                    log(f"{size} server log (last lines):\n{tail(tmp / size / 'server.log')}")
            raise SystemExit(1) from None

    print(f"\n{'scenario':<20}{'store':<8}{'req/s max (each round)':<28}{'p99 ms @50%':<22}{'large / small':>14}")
    for name in runs["small"]:
        means = {}
        for size in ("small", "large"):
            rates = [run["max"]["rps"] for run in runs[size][name]]
            p99s = [run["half_load"]["p99_ms"] for run in runs[size][name]]
            means[size] = statistics.mean(rates)
            ratio = f"{means['large'] / means['small']:.2f}x" if size == "large" else ""
            print(f"{name:<20}{size:<8}{', '.join(f'{r:.0f}' for r in rates):<28}"
                  f"{', '.join(f'{p:.1f}' for p in p99s):<22}{ratio:>14}")
    print(f"\nrows at the end: small {int(counts['small']):,}, large {int(counts['large']):,}")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "scale.json").write_text(json.dumps({
        "cpus": os.cpu_count(), "python": platform.python_version(), "rows": counts, "args": {
            k: v for k, v in vars(args).items() if k != "wrk"}, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
