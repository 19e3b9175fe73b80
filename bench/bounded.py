"""Does the token store stay bounded? Client-credentials issuance at the maximum rate for a long while, the
access_tokens row count sampled at a fixed interval, with short-lived tokens and the in-process purge.

    python bench/bounded.py                          # 10 minutes, a sample every 30 s, 60 s tokens
    python bench/bounded.py --duration 120 --sample 10

Flat means the purge keeps up: the live rows (issued within one token lifetime) plus at most about one
purge interval's worth of expired ones. Same cluster and server setup as bench/run.py.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (bench/run.py: the cluster, the server, the load tools)


def rows(port: int) -> tuple[int, int]:
    """(all access_tokens rows, expired ones)."""
    sql = "SELECT count(*), count(*) FILTER (WHERE expires_at < extract(epoch FROM now())) FROM access_tokens"
    command = [run.PG_BIN / "psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "iam_token"]
    done = subprocess.run([*command, "-AtF", " ", "-c", sql], capture_output=True, text=True, timeout=60)
    total, expired = done.stdout.split()
    return int(total), int(expired)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--duration", type=int, default=600, help="seconds of issuance at the maximum rate (default 600)")
    add("--sample", type=int, default=30, help="seconds between row counts (default 30)")
    add("--ttl", type=int, default=60, help="access token lifetime in seconds (default 60)")
    add("--purge-interval", type=int, default=60, help="the server's purge_interval (default 60)")
    add("--connections", type=int, default=32)
    add("--threads", type=int, default=1)
    add("--output", type=Path, default=run.BENCH / "results" / "bounded.json")
    args = parser.parse_args()
    args.wrk = shutil.which("wrk")
    tmp = Path(tempfile.mkdtemp(prefix="iam-bench-"))
    samples: list[dict] = []
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        if os.geteuid() == 0:
            shutil.chown(tmp, "postgres", "postgres")
        port = run.start_postgres(tmp, stack)
        secret = secrets.token_urlsafe(24)
        base = run.start_server(tmp, f"postgresql+asyncpg://postgres@127.0.0.1:{port}", secret, stack,
                                token_ttl=args.ttl, extra=f"purge_interval: {args.purge_interval}\n")
        basic = "Basic " + base64.b64encode(f"{run.CLIENT_ID}:{secret}".encode()).decode()
        scenario = run.scenarios(basic, run.get_token(base, basic))["client_credentials"]
        result: dict = {}
        load = threading.Thread(target=lambda: result.update(run.max_throughput(base, scenario, args, args.duration)))
        started = time.monotonic()
        load.start()
        while load.is_alive():
            total, expired = rows(port)
            samples.append({"t_s": round(time.monotonic() - started), "rows": total, "expired": expired})
            run.log(f"t={samples[-1]['t_s']:>4} s  rows={total:>8}  expired={expired:>8}")
            load.join(timeout=args.sample)
    print(f"\n{result.get('rps', 0):.0f} req/s issued for {args.duration} s ({result.get('tool')}), "
          f"token lifetime {args.ttl} s, purge_interval {args.purge_interval} s")
    print("   t (s)      rows   expired")
    for sample in samples:
        print(f"{sample['t_s']:>8} {sample['rows']:>9} {sample['expired']:>9}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                       "load": result, "samples": samples}, indent=2) + "\n")


if __name__ == "__main__":
    main()
