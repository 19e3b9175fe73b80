"""iam side by side with node-oidc-provider: `python bench/peer.py` (options: `--help`).

In one run, on this machine: the test suite's node-oidc-provider (tests/fixtures/oidc-provider, `npm ci` there
first) in its JWT mode (RFC 8707 resource indicators, ES256 JWT access tokens, its in-memory store) and one
`iam serve` (role token, PostgreSQL 15 with fsync on, hot cache off), each measured with the same wrk settings as
bench/run.py, scenario after scenario, alternating servers (peer, iam, peer, iam, ...) so that a change in the
machine's load shows in both. Each measured run also reads the server process's CPU time, so the rate per core
used is reported next to the rate. Prints every round and the iam / peer ratios of the means.

For client_credentials and introspect, each side is then paced at half its own max rate (open loop, wrk with
bench/wrk.lua's pacing) for its p50 and p99, and nginx answering a fixed body is paced at the same rate right after:
the floor's p99 is what this machine and the load generator alone add at that rate. Then both sides are paced at
the same rate, half of the slower one's max, so that their p99s compare like for like. Needs nginx for those runs.

Scenarios: client_credentials (the peer signs an ES256 JWT; iam stores an opaque token's row durably and signs
its JWT), introspect (iam: every call a cache miss, one indexed row read; the peer: an opaque token of its
in-memory store, as it cannot introspect its JWTs), introspect_signed (the same, answered as an RFC 9701 JWT signed
with ES256, the bench client's introspection_signed_response_alg on both), discovery, jwks.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from joserfc.jwk import ECKey

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

import run  # noqa: E402  (bench/run.py: the cluster, the server, the scenarios, wrk)

from tests.oidc_upstream import new_signing_key, running_upstream  # noqa: E402  (the suite's real provider)

SCENARIOS = ["client_credentials", "introspect", "introspect_signed", "discovery", "jwks"]
LATENCY = {"client_credentials", "introspect"}  # the scenarios with a p99 target at half load (issue #18)
SIGNED = "application/token-introspection+jwt"  # RFC 9701
RESOURCE = "https://api.bench.example"
OPAQUE_RESOURCE = "https://opaque.bench.example"


def peer_scenarios(secret: str, stack: contextlib.ExitStack, tmp: Path) -> tuple[int, dict]:
    """The peer in its JWT mode, with the bench client; its pid and its scenarios as (base, Scenario)."""
    peer = stack.enter_context(running_upstream(tmp))
    es256 = ECKey.generate_key("P-256", parameters={"kid": "bench-es256", "alg": "ES256", "use": "sig"},
                               private=True).as_dict(private=True)
    peer.configure(jwks={"keys": [new_signing_key(), es256]},
                   resource_servers=[{"url": RESOURCE, "scope": "api:read", "format": "jwt", "alg": "ES256"},
                                     # its JWT access tokens cannot be introspected: opaque ones for introspect
                                     {"url": OPAQUE_RESOURCE, "scope": "api:read", "format": "opaque"}])
    peer.add_client(run.CLIENT_ID, secret, [], grant_types=["client_credentials"], response_types=[],
                    introspection_signed_response_alg="ES256")
    metadata = httpx.get(f"{peer.issuer}/.well-known/openid-configuration").json()
    basic = {"Authorization": "Basic " + base64.b64encode(f"{run.CLIENT_ID}:{secret}".encode()).decode(),
             "Content-Type": "application/x-www-form-urlencoded"}
    grant = "grant_type=client_credentials&scope=api:read"
    issued = httpx.post(metadata["token_endpoint"], headers=basic, content=grant)
    if issued.raise_for_status().json()["access_token"].count(".") != 2:
        raise SystemExit(f"the peer did not issue a JWT access token: {issued.text}")
    opaque = httpx.post(metadata["token_endpoint"], headers=basic, content=f"{grant}&resource={OPAQUE_RESOURCE}")
    token = opaque.raise_for_status().json()["access_token"]
    introspect = (metadata["introspection_endpoint"], f"token={token}")
    signed = httpx.post(introspect[0], headers={**basic, "Accept": SIGNED}, content=introspect[1])
    if not signed.raise_for_status().headers["content-type"].startswith(SIGNED):
        raise SystemExit(f"the peer did not answer an RFC 9701 JWT: {signed.text}")
    return peer.pid, {
        "client_credentials": ("POST", metadata["token_endpoint"], basic, grant),
        "introspect": ("POST", introspect[0], basic, introspect[1]),
        "introspect_signed": ("POST", introspect[0], {**basic, "Accept": SIGNED}, introspect[1]),
        "discovery": ("GET", f"{peer.issuer}/.well-known/openid-configuration", {}, ""),
        "jwks": ("GET", metadata["jwks_uri"], {}, ""),
    }


def iam_scenarios(base: str, secret: str) -> dict:
    basic = "Basic " + base64.b64encode(f"{run.CLIENT_ID}:{secret}".encode()).decode()
    by_name = run.scenarios(basic, run.get_token(base, basic))
    picked = {"client_credentials": by_name["client_credentials"], "introspect": by_name["introspect_json"],
              "introspect_signed": by_name["introspect_signed"],
              "discovery": by_name["discovery"], "jwks": by_name["jwks"]}
    return {name: (s.method, base + s.path, s.headers, s.body) for name, s in picked.items()}


def as_scenario(name: str, request: tuple) -> tuple[str, run.Scenario]:
    method, url, headers, body = request
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}", run.Scenario(name, method, parts.path, headers, body)


def measure(side: str, name: str, request: tuple, pid: int, args: argparse.Namespace) -> dict:
    """One warm-up, one measured run: requests/s and the cores the server process used; for the LATENCY
    scenarios also a run paced at half that rate (see `paced`)."""
    base, scenario = as_scenario(name, request)
    run.run_wrk(base, scenario, args, 1)
    cpu, started = run.cpu_seconds(pid), time.monotonic()
    result = run.run_wrk(base, scenario, args, args.duration)
    cores = (run.cpu_seconds(pid) - cpu) / (time.monotonic() - started)
    if result["non2xx"] or result["errors"]:
        raise SystemExit(f"{side} {name}: {result}")
    run.log(f"{name} {side}: {result['rps']:.0f} req/s on {cores:.2f} cores")
    measured = {"rps": result["rps"], "cores": cores}
    if name in LATENCY and args.floor:
        measured["own"] = paced(side, name, request, result["rps"] * args.load_ratio, args)
    return measured


def paced(side: str, name: str, request: tuple, rate: float, args: argparse.Namespace) -> dict:
    """p50 and p99 of a run paced at `rate`, and the p99 of the floor paced at the same rate right after."""
    base, scenario = as_scenario(name, request)
    half = run.run_paced(base, scenario, args, args.duration, rate)
    floor = run.run_paced(args.floor, run.FLOOR, args, args.duration, rate)
    if half["non2xx"] or half["errors"]:
        raise SystemExit(f"{side} {name} paced: {half}")
    run.log(f"{name} {side} at {rate:.0f}/s: p50 {half['p50_ms']} ms, p99 {half['p99_ms']} ms; "
            f"the floor's p99 {floor['p99_ms']} ms")
    return {"rate": rate, "p50": half["p50_ms"], "p99": half["p99_ms"], "floor_p99": floor["p99_ms"]}


def latency_table(title: str, rows: list, key: str) -> None:
    print(f"\n{title}, each round (the floor's p99 at the same rate in brackets); iam/peer of the medians")
    print(f"{'scenario':<19} {'node-oidc-provider':<34} {'iam':<34} iam/peer")
    for name, runs in rows:
        cells = {side: ", ".join(f"{r[key]['p99']:.1f} ({r[key]['floor_p99']:.1f})" for r in results)
                 for side, results in runs.items()}
        median = {side: statistics.median(r[key]["p99"] for r in results) for side, results in runs.items()}
        print(f"{name:<19} {cells['peer']:<34} {cells['iam']:<34} {median['iam'] / median['peer']:>7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=int, default=5, help="seconds per measured run (default 5)")
    parser.add_argument("--rounds", type=int, default=2, help="peer/iam alternations per scenario (default 2)")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma-separated, of {SCENARIOS}")
    parser.add_argument("--load-ratio", type=float, default=0.5, help="paced rate / max rate (default 0.5)")
    args = parser.parse_args()
    args.threads, args.wrk, args.floor = 1, shutil.which("wrk"), None
    if not args.wrk:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk)")
    names = args.scenarios.split(",")
    secret = secrets.token_urlsafe(24)
    with tempfile.TemporaryDirectory(prefix="iam-peer-") as tmp, contextlib.ExitStack() as stack:
        (Path(tmp) / "peer").mkdir()
        peer_pid, peer = peer_scenarios(secret, stack, Path(tmp) / "peer")
        cluster = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="iam-peer-pg-")))
        if os.geteuid() == 0:  # the cluster lives inside and runs as postgres
            shutil.chown(cluster, "postgres", "postgres")
        pg_port = run.start_postgres(cluster, stack)
        base = run.start_server(cluster, f"postgresql+asyncpg://postgres@127.0.0.1:{pg_port}", secret, stack,
                                cache_seconds=0, signed_alg="ES256")
        sides = {"peer": (peer_pid, peer), "iam": (run.SERVERS[base].pid, iam_scenarios(base, secret))}
        args.floor = run.start_floor(cluster, stack)
        rows = []
        for name in names:
            runs: dict[str, list[dict]] = {"peer": [], "iam": []}
            for _ in range(args.rounds):
                for side, (pid, requests) in sides.items():
                    runs[side].append(measure(side, name, requests[name], pid, args))
                if name in LATENCY and args.floor:  # and both at the same rate: half of the slower one's max
                    rate = args.load_ratio * min(results[-1]["rps"] for results in runs.values())
                    for side, (_, requests) in sides.items():
                        runs[side][-1]["same"] = paced(side, name, requests[name], rate, args)
            rows.append((name, runs))
    print(f"\n{'scenario':<19} {'node-oidc-provider req/s (cores)':<34} {'iam req/s (cores)':<28} "
          "iam/peer  per core")
    for name, runs in rows:
        rate = {side: statistics.mean(r["rps"] for r in results) for side, results in runs.items()}
        per_core = {side: statistics.mean(r["rps"] / r["cores"] for r in results if r["cores"])
                    for side, results in runs.items()}
        cells = {side: ", ".join(f"{r['rps']:.0f} ({r['cores']:.2f})" for r in results)
                 for side, results in runs.items()}
        print(f"{name:<19} {cells['peer']:<34} {cells['iam']:<28} {rate['iam'] / rate['peer']:>7.2f}  "
              f"{per_core['iam'] / per_core['peer']:>8.2f}")
    latency = [(name, runs) for name, runs in rows if "own" in runs["iam"][0]]
    if latency:
        pct = f"{args.load_ratio:.0%}"
        latency_table(f"p99 ms at {pct} of each one's own req/s max", latency, "own")
        latency_table(f"p99 ms with both at the same rate, {pct} of the slower one's req/s max", latency, "same")
    print(f"\nwrk, 1 thread, {args.connections} connections, {args.duration} s per run after 1 s warm-up; both "
          "servers single-process on this machine, alternating; iam on PostgreSQL 15 (fsync on), hot cache off.")
    if latency:
        print(f"Paced runs: wrk with bench/wrk.lua's BENCH_RATE, {args.connections} connections, one per thread, "
              "open loop; the floor is nginx answering a fixed body.")


if __name__ == "__main__":
    main()
