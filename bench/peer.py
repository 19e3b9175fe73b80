"""Discovery and JWKS side by side with node-oidc-provider: `python bench/peer.py` (options: `--help`).

In one run, on this machine: the test suite's node-oidc-provider (tests/fixtures/oidc-provider, `npm ci` there
first) and one `iam serve` (role token, SQLite: these documents never touch a store), each measured with the
same wrk settings as bench/run.py, scenario after scenario, alternating servers (peer, iam, peer, iam, ...) so
that a change in the machine's load shows in both. Prints req/s per round and the iam / peer ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import httpx

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

import run  # noqa: E402  (bench/run.py: the server, the scenarios, wrk)

from tests.oidc_upstream import running_upstream  # noqa: E402  (the suite's real node-oidc-provider)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5, help="seconds per measured run (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="peer/iam alternations per document (default 2)")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    args.threads, args.wrk = 1, shutil.which("wrk")
    if not args.wrk:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk)")
    with tempfile.TemporaryDirectory(prefix="iam-peer-") as tmp, contextlib.ExitStack() as stack:
        (Path(tmp) / "peer").mkdir()
        peer = stack.enter_context(running_upstream(Path(tmp) / "peer"))
        iam = run.start_server(Path(tmp), f"sqlite+aiosqlite:///{tmp}", secrets.token_urlsafe(24), stack)
        peer_jwks = httpx.get(f"{peer.issuer}/.well-known/openid-configuration").json()["jwks_uri"]
        targets = {
            "discovery": (f"{peer.issuer}/.well-known/openid-configuration", f"{iam}/.well-known/openid-configuration"),
            "jwks": (peer_jwks, f"{iam}/oauth/v2/jwks"),
        }
        rows = []
        for name, urls in targets.items():
            rates: dict[str, list[float]] = {"peer": [], "iam": []}
            for _ in range(args.rounds):
                for side, url in zip(("peer", "iam"), urls, strict=True):
                    parts = urlsplit(url)
                    base, path = f"{parts.scheme}://{parts.netloc}", parts.path
                    scenario = run.Scenario(name, "GET", path)
                    run.run_wrk(base, scenario, args, 1)  # warm-up
                    result = run.run_wrk(base, scenario, args, args.duration)
                    if result["non2xx"] or result["errors"]:
                        raise SystemExit(f"{side} {name}: {result}")
                    rates[side].append(result["rps"])
                    run.log(f"{name} {side}: {result['rps']:.0f} req/s")
            ratio = statistics.mean(rates["iam"]) / statistics.mean(rates["peer"])
            rows.append((name, rates["peer"], rates["iam"], ratio))
    print(f"\n{'document':<10} {'node-oidc-provider req/s':<28} {'iam req/s':<22} iam / peer")
    for name, peer_rates, iam_rates, ratio in rows:
        print(f"{name:<10} {', '.join(f'{r:.0f}' for r in peer_rates):<28} "
              f"{', '.join(f'{r:.0f}' for r in iam_rates):<22} {ratio:.2f}")
    print(f"\nwrk, 1 thread, {args.connections} connections, {args.duration} s per run after 1 s warm-up; both "
          "servers single-process on this machine, alternating.")


if __name__ == "__main__":
    main()
