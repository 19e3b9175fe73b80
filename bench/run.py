"""Benchmark the token role end to end: `python bench/run.py` (options: `--help`, bench/README.md).

What it does, in order:
1. creates a throw-away PostgreSQL 15 cluster in a temp dir (trust auth, 127.0.0.1, a free port) with the
   databases iam_token, iam_authn and iam_users;
2. writes a bench config (one confidential client_credentials client) and starts `iam serve` as a real
   process, one worker, role `token`, and waits for /health/ready;
3. gets one access token T, and checks once that every scenario answers 200;
4. for each scenario: a short warm-up, a max-throughput run (wrk, closed loop), then a run paced at half
   that rate (open loop: wrk with bench/wrk.lua's pacing, or bench/loadgen.py) whose p50/p99 are the latencies
   reported, then the same paced run against nginx answering a fixed body (the machine's floor, if installed);
5. prints one table and writes bench/results/latest.json;
6. stops the server and the cluster and deletes the temp dir, also on errors and Ctrl-C.

All traffic stays on 127.0.0.1; every load run is bounded by its duration (and loadgen by a request cap).
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
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))
CLIENT_ID = "bench"
SECRET_ENV = "IAM_BENCH_CLIENT_SECRET"  # the client secret reaches the server only through its environment
SCENARIOS = ["health", "client_credentials", "introspect_json", "introspect_jwt", "introspect_signed", "phantom",
             "discovery", "jwks", "jwks_304"]

CONFIG = """\
# Written by bench/run.py for one benchmark run; deleted with its temp dir.
role: token
issuer: http://127.0.0.1:{port}
stores:
  token: ${{IAM_TOKEN_DATABASE_URL}}
  authn: {db}/iam_authn
  users: {db}/iam_users
keys:
  dir: {keys}
migrate_on_start: true
log_level: warning
clients:
  - client_id: {client_id}
    client_name: benchmark client
    client_secret: ${{{secret_env}}}
    grant_types: [client_credentials]
    token_endpoint_auth_method: client_secret_basic
    scope: "api:read"
    introspection: true
    access_token_ttl: {token_ttl}   # T must outlive the whole run
{client_extra}introspection_cache_seconds: {cache_seconds}   # 0 (--no-cache): every check is an indexed lookup
{extra}"""


SERVERS: dict[str, subprocess.Popen] = {}  # the running `iam serve` processes by base URL (CPU accounting)


class BenchError(Exception):
    """The benchmark cannot go on; the message says why."""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 20) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


# -- PostgreSQL ----------------------------------------------------------------------------------------
def as_postgres(*cmd: str | Path) -> list[str]:
    """PostgreSQL refuses to run as root: as root, run its tools as the `postgres` OS user."""
    cmd = [str(part) for part in cmd]
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def start_postgres(tmp: Path, stack: contextlib.ExitStack, settings: str = "") -> int:
    """initdb + pg_ctl start in tmp, create the three databases; return the cluster's port.

    `settings`: more server options (`-c name=value ...`)."""
    data, pg_log, port = tmp / "pgdata", tmp / "postgres.log", free_port()
    run = lambda cmd: subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)  # noqa: E731
    log(f"initdb in {data}")
    # -N (--no-sync) only skips initdb's own final fsync; the server runs with its default fsync=on.
    run(as_postgres(PG_BIN / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "-N"))
    options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={tmp} {settings}"
    try:
        run(
            as_postgres(PG_BIN / "pg_ctl", "-D", data, "-l", pg_log, "-o", options, "-w", "-t", "60", "start")
        )
    except subprocess.CalledProcessError:
        raise BenchError(f"PostgreSQL did not start:\n{tail(pg_log)}") from None
    stack.callback(stop_postgres, data)
    for name in ("iam_token", "iam_authn", "iam_users"):
        run([PG_BIN / "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", name])
    log(f"PostgreSQL 15 on 127.0.0.1:{port}")
    return port


def db_sessions(port: int | None) -> int | None:
    """Sessions ever opened on iam_token (pg_stat_database): shows how often the server's pool reconnects."""
    if port is None:  # SQLite
        return None
    sql = "SELECT sessions FROM pg_stat_database WHERE datname = 'iam_token'"
    command = [PG_BIN / "psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "iam_token"]
    done = subprocess.run([*command, "-Atc", sql], capture_output=True, text=True, timeout=30)
    return int(done.stdout) if done.returncode == 0 and done.stdout.strip().isdigit() else None


def stop_postgres(data: Path) -> None:
    log("stopping PostgreSQL")
    command = as_postgres(PG_BIN / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
    subprocess.run(command, capture_output=True, timeout=60)


# -- the iam server ------------------------------------------------------------------------------------
def start_server(tmp: Path, db: str, secret: str, stack: contextlib.ExitStack, cache_seconds: int = 5,
                 token_ttl: int = 3600, extra: str = "", signed_alg: str | None = None,
                 database: str = "iam_token", cgroup: Path | None = None) -> str:
    """Write the bench config into `tmp`, start `iam serve` on the token store `database` and wait until it is
    ready; return its base URL. With `cgroup` (--cpu-limit) it runs inside that cgroup from its start.

    The server runs in its own session, so a Ctrl-C reaches only this script, which then stops it in order.
    """
    port = free_port()
    config = tmp / "iam-bench.yaml"
    config.write_text(
        CONFIG.format(port=port, db=db, keys=tmp / "keys", client_id=CLIENT_ID, secret_env=SECRET_ENV,
                      cache_seconds=cache_seconds, token_ttl=token_ttl, extra=extra,
                      client_extra=f"    introspection_signed_response_alg: {signed_alg}\n" if signed_alg else "")
    )
    # A clean environment: IAM_KEYS_DIR, IAM_ISSUER, ... from the caller's shell would override the config.
    env = {k: v for k, v in os.environ.items() if not k.startswith("IAM_") and k != "SERVICE_ROLE"}
    env |= {
        "SERVICE_ROLE": "token",
        "IAM_TOKEN_DATABASE_URL": f"{db}/{database}",
        "IAM_CONFIG": str(config),
        SECRET_ENV: secret,
        # A token role running apart must name its peer roles. The benchmarked endpoints never call them,
        # so they point at a closed loopback port (an older iam without peers ignores these variables).
        "IAM_USERS_URL": "http://127.0.0.1:9",
        "IAM_AUTHN_URL": "http://127.0.0.1:9",
    }
    iam = shutil.which("iam")
    command = [iam] if iam else [sys.executable, "-c", "from iam.cli import main; main()"]
    command = [*command, "serve", "--port", str(port), "--grace", "2"]
    if cgroup is not None:
        from tests.cpu_limit import inside

        command = inside(cgroup, command)
    server_log = tmp / "server.log"
    with server_log.open("wb") as out:
        process = subprocess.Popen(
            command,
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    stack.callback(stop_server, process)
    base = f"http://127.0.0.1:{port}"
    SERVERS[base] = process
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"iam serve exited with {process.returncode}:\n{tail(server_log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health/ready", timeout=2).status_code == 200:
                log(f"iam serve (pid {process.pid}) ready at {base}")
                return base
        time.sleep(0.2)
    raise BenchError(f"iam serve not ready after 60 s:\n{tail(server_log)}")


FLOOR_CONFIG = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  {temp_paths}
  server {{
    listen 127.0.0.1:{port};
    location / {{ default_type application/json; return 200 '{{"status":"ok"}}'; }}
  }}
}}
"""


def start_floor(tmp: Path, stack: contextlib.ExitStack) -> str | None:
    """The machine's floor: nginx answering a fixed 16-byte body, no work. Paced at the same rate with the same
    tool, its p99 is what this machine's scheduling, the load generator and loopback add to any server's; the
    half-load latencies of iam are read against it. None when nginx is not installed."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not nginx:
        return None
    directory, port = tmp / "floor", free_port()
    directory.mkdir()
    temp_paths = " ".join(f"{kind}_temp_path {directory}/{kind};"
                          for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (directory / "nginx.conf").write_text(FLOOR_CONFIG.format(dir=directory, port=port, temp_paths=temp_paths))
    command = [nginx, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-e", str(directory / "error.log"),
               "-g", "daemon off;"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    stack.callback(lambda: (process.terminate(), process.wait(timeout=15)))
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(base, timeout=2).status_code == 200:
                return base
        time.sleep(0.1)
    raise BenchError(f"nginx (the floor) did not start: {tail(directory / 'error.log')}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads included (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop_server(process: subprocess.Popen) -> None:
    log("stopping iam serve")
    process.terminate()  # SIGTERM: uvicorn drains (--grace 2) and exits
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# -- scenarios -----------------------------------------------------------------------------------------
@dataclass
class Scenario:
    name: str
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: str = ""
    random_tokens: int = 0  # > 0: `{token}` in the body is one of that many seeded tokens (bench/scale.py)

    def env(self) -> dict[str, str]:
        """The request, as bench/wrk.lua and bench/loadgen.py read it."""
        headers = "\n".join(f"{k}: {v}" for k, v in self.headers.items())
        return {**os.environ, "BENCH_METHOD": self.method, "BENCH_HEADERS": headers, "BENCH_BODY": self.body,
                "BENCH_RANDOM_TOKENS": str(self.random_tokens)}


def scenarios(basic: str, token: str) -> dict[str, Scenario]:
    form = {"Content-Type": "application/x-www-form-urlencoded", "Authorization": basic}
    jwt_form = {**form, "Accept": "application/jwt"}  # the phantom JWT instead of RFC 7662 JSON
    signed_form = {**form, "Accept": "application/token-introspection+jwt"}  # RFC 9701, the client's alg
    return {
        s.name: s
        for s in [
            Scenario("health", "GET", "/health/live"),
            Scenario("client_credentials", "POST", "/oauth/v2/token", form, "grant_type=client_credentials"),
            Scenario("introspect_json", "POST", "/oauth/v2/introspect", form, f"token={token}"),
            Scenario("introspect_jwt", "POST", "/oauth/v2/introspect", jwt_form, f"token={token}"),
            Scenario("introspect_signed", "POST", "/oauth/v2/introspect", signed_form, f"token={token}"),
            Scenario("phantom", "GET", "/oauth/v2/phantom", {"Authorization": f"Bearer {token}"}),
            Scenario("discovery", "GET", "/.well-known/openid-configuration"),
            Scenario("jwks", "GET", "/oauth/v2/jwks"),
            # a cache revalidating: the ETag of the JWKS, filled in by main() (see with_etag)
            Scenario("jwks_304", "GET", "/oauth/v2/jwks", {"If-None-Match": "{etag}"}),
        ]
    }


def with_etag(base: str, scenario: Scenario) -> Scenario:
    """jwks_304 sends the JWKS's current ETag; a server without ETags gets a placeholder (and fails the check)."""
    etag = httpx.get(base + scenario.path, timeout=10).headers.get("etag", '"none"')
    return Scenario(scenario.name, scenario.method, scenario.path, {"If-None-Match": etag})


def get_token(base: str, basic: str) -> str:
    response = httpx.post(
        f"{base}/oauth/v2/token",
        data={"grant_type": "client_credentials"},
        headers={"Authorization": basic},
        timeout=10,
    )
    if response.status_code != 200:
        raise BenchError(f"could not get an access token: {response.status_code} {response.text}")
    return response.json()["access_token"]


def sanity_check(base: str, scenario: Scenario) -> None:
    """One request per scenario before any load: 200 and the expected shape, or stop here."""
    url, body = base + scenario.path, scenario.body or None
    r = httpx.request(scenario.method, url, headers=scenario.headers, content=body, timeout=10)
    checks = {
        "health": lambda: r.json() == {"status": "ok"},
        "client_credentials": lambda: "access_token" in r.json(),
        "introspect_json": lambda: r.json().get("active") is True,
        "introspect_jwt": lambda: (
            r.headers["content-type"].startswith("application/jwt") and r.text.count(".") == 2
        ),
        "introspect_signed": lambda: r.headers["content-type"].startswith("application/token-introspection+jwt"),
        "phantom": lambda: r.headers.get("authorization", "").startswith("Bearer ey"),
        "discovery": lambda: "issuer" in r.json(),
        "jwks": lambda: bool(r.json()["keys"]),
        "jwks_304": lambda: True,
    }
    expected = 304 if scenario.name == "jwks_304" else 200
    if r.status_code != expected or not checks[scenario.name]():
        raise BenchError(f"sanity check failed for {scenario.name}: {r.status_code} {r.text[:300]}")


# -- load tools (separate processes) -------------------------------------------------------------------
def _wrk(threads: int, base: str, scenario: Scenario, args: argparse.Namespace, duration: int,
         **env: str) -> tuple[dict, float]:
    """Run wrk with bench/wrk.lua (`env` added to the scenario's); its BENCH_JSON line and the run's seconds."""
    command = [
        args.wrk, f"-t{threads}", f"-c{args.connections}", f"-d{duration}s",
        "--timeout", "5s", "-s", str(BENCH / "wrk.lua"), base + scenario.path,
    ]  # fmt: skip
    done = subprocess.run(command, env={**scenario.env(), **env}, capture_output=True, text=True,
                          timeout=duration + 60)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH_JSON ")), None)
    if done.returncode != 0 or line is None:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    return raw, raw["duration_us"] / 1e6


def run_wrk(base: str, scenario: Scenario, args: argparse.Namespace, duration: int) -> dict:
    raw, seconds = _wrk(args.threads, base, scenario, args, duration)
    return {
        "tool": "wrk",
        "requests": raw["requests"],
        "rps": round(raw["requests"] / seconds, 1),
        "non2xx": raw["non2xx"],
        "errors": raw["connect_errors"] + raw["read_errors"] + raw["write_errors"] + raw["timeouts"],
        "p50_ms": raw["p50_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
    }


def run_loadgen(
    base: str, scenario: Scenario, args: argparse.Namespace, duration: int, rate: float = 0.0
) -> dict:
    command = [
        sys.executable, str(BENCH / "loadgen.py"), base + scenario.path,
        "--connections", str(args.connections), "--duration", str(duration),
    ]  # fmt: skip
    if rate:
        command += ["--rate", f"{rate:.1f}"]
    done = subprocess.run(command, env=scenario.env(), capture_output=True, text=True, timeout=duration + 60)
    if done.returncode != 0:
        raise BenchError(f"loadgen failed ({done.returncode}): {done.stderr}")
    return json.loads(done.stdout)


def run_paced(base: str, scenario: Scenario, args: argparse.Namespace, duration: int, rate: float) -> dict:
    """The half-load latency run: open loop at `rate`, by wrk (bench/wrk.lua's BENCH_RATE) or bench/loadgen.py."""
    if not args.wrk:
        return run_loadgen(base, scenario, args, duration, rate)
    n = args.connections  # one connection per wrk thread: each thread keeps its own connection's schedule
    raw, seconds = _wrk(n, base, scenario, args, duration, BENCH_RATE=f"{rate:.1f}", BENCH_THREADS=str(n))
    return {
        "tool": "wrk paced (bench/wrk.lua)", "mode": "open-loop", "target_rps": rate,
        "requests": raw["requests"], "elapsed_s": round(seconds, 3), "rps": round(raw["requests"] / seconds, 1),
        "non2xx": raw["non2xx"], "errors": raw["errors"],
        **{f"{q}_ms": raw[f"{q}_us"] / 1000 for q in ("p50", "p90", "p99", "max")},
    }  # fmt: skip


def max_throughput(base: str, scenario: Scenario, args: argparse.Namespace, duration: int) -> dict:
    if args.wrk:
        return run_wrk(base, scenario, args, duration)
    return run_loadgen(base, scenario, args, duration)


FLOOR = Scenario("floor", "GET", "/")


def bench_scenario(base: str, scenario: Scenario, args: argparse.Namespace, pg_port: int | None,
                   floor: str | None = None) -> dict:
    if args.warmup > 0:  # fills the DB pool and warms caches; not recorded
        max_throughput(base, scenario, args, args.warmup)
    before = db_sessions(pg_port)
    peak = max_throughput(base, scenario, args, args.duration)
    after = db_sessions(pg_port)
    # Diagnostic: PostgreSQL sessions opened during the max run (less the psql that asked). Counts are
    # flushed by PostgreSQL about once a second, so this is approximate; near 0 means a stable pool.
    peak["db_sessions_opened"] = None if before is None or after is None else max(0, after - before - 1)
    log(f"{scenario.name}: {peak['rps']:.0f} req/s max ({peak['tool']})")
    half = run_paced(base, scenario, args, args.duration, peak["rps"] * args.load_ratio)
    log(f"{scenario.name}: {half['rps']:.0f} req/s paced, p50 {half['p50_ms']} ms, p99 {half['p99_ms']} ms")
    result = {"scenario": scenario.name, "max": peak, "half_load": half}
    if floor:  # the same rate, the same tool, right after: what the machine alone adds at this rate
        result["floor"] = run_paced(floor, FLOOR, args, args.duration, half["target_rps"])
        log(f"{scenario.name}: the floor at that rate: p50 {result['floor']['p50_ms']} ms, "
            f"p99 {result['floor']['p99_ms']} ms")
    return result


# -- output --------------------------------------------------------------------------------------------
def short(half: dict) -> bool:
    return half["rps"] < 0.95 * half["target_rps"]


def table(results: list[dict], args: argparse.Namespace) -> str:
    baseline = next((r["max"]["rps"] for r in results if r["scenario"] == "health"), None)
    pct = round(args.load_ratio * 100)
    head = ["scenario", "req/s max", "vs health", f"req/s @{pct}%", "p50 ms", "p99 ms", "floor p99", "non-2xx",
            "sock err"]
    rows = [[*head, "new db conns"]]
    for r in results:
        peak, half = r["max"], r["half_load"]
        ratio = f"{peak['rps'] / baseline:.2f}" if baseline else "-"
        rows.append([
            # "*": the paced run fell short of its target rate, so its latencies include a backlog
            r["scenario"], f"{peak['rps']:.0f}", ratio, f"{half['rps']:.0f}" + ("*" if short(half) else ""),
            f"{half['p50_ms']:.2f}" if half["p50_ms"] is not None else "-",
            f"{half['p99_ms']:.2f}" if half["p99_ms"] is not None else "-",
            f"{r['floor']['p99_ms']:.2f}" if r.get("floor") else "-",
            f"{peak['non2xx']}/{half['non2xx']}", f"{peak['errors']}/{half['errors']}",
            str(peak.get("db_sessions_opened", "-")),
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]

    def line(row: list[str]) -> str:  # first column left-aligned, numbers right-aligned
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )

    return "\n".join([line(rows[0]), line(["-" * w for w in widths]), *map(line, rows[1:])])


def tools_note(args: argparse.Namespace) -> str:
    peak = f"wrk, {args.threads} thread(s)" if args.wrk else "bench/loadgen.py closed loop"
    paced = "wrk (bench/wrk.lua BENCH_RATE), one thread per connection," if args.wrk else "bench/loadgen.py"
    pct = f"{args.load_ratio:.0%}"
    return "\n".join([
        f"req/s max: {peak}, {args.connections} connections, {args.duration:g} s per scenario after a "
        f"{args.warmup:g} s warm-up; vs health: req/s max / health req/s max of this run.",
        f"req/s @{pct}, p50, p99: {paced} open loop paced at {pct} of req/s max, "
        f"{args.connections} keep-alive connections; latency from each request's scheduled send time.",
        "floor p99: nginx answering a fixed body, paced the same way at the same rate right after: what this "
        "machine and the load generator alone add" + ("." if args.floor else " (not run: nginx not installed)."),
        "non-2xx, sock err: max run / paced run. new db conns: PostgreSQL sessions opened during the max run "
        "(pg_stat_database, approximate). *: paced run below 95% of its target rate.",
        f"Server: `iam serve`, 1 uvicorn worker, role token, "
        f"{'SQLite' if args.store == 'sqlite' else 'PostgreSQL 15 (fsync on)'}, hot cache "
        f"{'off' if args.no_cache else 'on'}; load generators, "
        f"server and database share this {os.cpu_count()}-CPU machine"
        + ("." if args.cpu_limit is None else f"; the server under a cgroup CPU limit of {args.cpu_limit:g}."),
    ])  # fmt: skip


# -- main ----------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--duration", type=int, default=10, help="seconds per measured run (default 10)")
    add("--connections", type=int, default=32, help="concurrent connections (default 32)")
    add("--threads", type=int, default=1, help="wrk threads (default 1)")
    add("--warmup", type=int, default=1, help="unrecorded warm-up seconds per scenario (default 1)")
    add("--load-ratio", type=float, default=0.5, help="paced rate / max rate (default 0.5)")
    add("--scenarios", default=",".join(SCENARIOS), help="comma-separated subset (default: all)")
    add("--tool", choices=["auto", "wrk", "python"], default="auto", help="max-throughput generator")
    add("--no-cache", action="store_true",
        help="turn the token role's hot cache off: every introspection and forward-auth check is a store lookup")
    add("--store", choices=["postgresql", "sqlite"], default="postgresql",
        help="the token store: a throw-away PostgreSQL 15 cluster (default), or SQLite files (the embedded default)")
    add("--signed-alg", choices=["RS256", "ES256", "EdDSA", "Ed25519"], default=None,
        help="the bench client's introspection_signed_response_alg (introspect_signed); default: the server's")
    add("--cpu-limit", type=float, default=None,
        help="run the server under a cgroup CPU limit of this many CPUs, as a container's resources.limits.cpu "
             "(tests/cpu_limit.py; needs root and a writable cgroup file system; default: no limit)")
    add("--output", type=Path, default=BENCH / "results" / "latest.json", help="JSON results file")
    args = parser.parse_args()
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if unknown := set(args.scenarios) - set(SCENARIOS):
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    if not 0 < args.load_ratio <= 1 or args.duration < 1 or args.connections < 1:
        parser.error("need --duration >= 1, --connections >= 1 and 0 < --load-ratio <= 1")
    args.wrk = shutil.which("wrk") if args.tool != "python" else None
    if args.tool == "wrk" and not args.wrk:
        parser.error("wrk is not installed (Debian: apt-get install -y wrk)")
    if args.tool == "auto" and not args.wrk:
        log("wrk not found (Debian: apt-get install -y wrk): measuring max req/s with bench/loadgen.py")
    args.floor = None  # the floor's base URL, once started (main)
    return args


def cpu_limit(cpus: float | None, stack: contextlib.ExitStack) -> Path | None:
    """A throw-away cgroup allowing `cpus` CPUs (--cpu-limit), removed when the stack closes; None without."""
    if cpus is None:
        return None
    sys.path.insert(0, str(BENCH.parent))  # the test suite's helper, as bench/signin.py uses it
    from tests.cpu_limit import CgroupUnavailable, cpu_limited

    try:
        return stack.enter_context(cpu_limited(cpus))
    except CgroupUnavailable as error:
        raise BenchError(f"--cpu-limit: {error}") from error


def _interrupt(*_) -> None:
    """SIGTERM is handled like Ctrl-C, so the ExitStack still stops the server and the cluster."""
    raise KeyboardInterrupt


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    signal.signal(signal.SIGTERM, _interrupt)
    tmp = Path(tempfile.mkdtemp(prefix="iam-bench-"))
    with contextlib.ExitStack() as stack:
        try:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)  # runs last: after server and cluster stop
            if os.geteuid() == 0:
                shutil.chown(tmp, "postgres", "postgres")  # the cluster lives inside and runs as postgres
            if args.store == "sqlite":  # the embedded default: one file per store in the temp dir
                pg_port, db = None, f"sqlite+aiosqlite:///{tmp}"
            else:
                pg_port = start_postgres(tmp, stack)
                db = f"postgresql+asyncpg://postgres@127.0.0.1:{pg_port}"
            secret = secrets.token_urlsafe(24)
            base = start_server(tmp, db, secret, stack, cache_seconds=0 if args.no_cache else 5,
                                signed_alg=args.signed_alg, cgroup=cpu_limit(args.cpu_limit, stack))
            basic = "Basic " + base64.b64encode(f"{CLIENT_ID}:{secret}".encode()).decode()
            all_scenarios = scenarios(basic, get_token(base, basic))
            all_scenarios["jwks_304"] = with_etag(base, all_scenarios["jwks_304"])
            for name in args.scenarios:
                sanity_check(base, all_scenarios[name])
            log(f"sanity checks passed; running {', '.join(args.scenarios)} ({args.duration:g} s each)")
            args.floor = start_floor(tmp, stack)
            results = [bench_scenario(base, all_scenarios[name], args, pg_port, args.floor)
                       for name in args.scenarios]
        except BenchError as exc:
            log(f"error: {exc}")
            if (tmp / "server.log").exists():
                log(f"server log (last lines):\n{tail(tmp / 'server.log')}")
            raise SystemExit(1) from None
        except KeyboardInterrupt:
            log("interrupted: cleaning up")
            raise SystemExit(130) from None

    print()
    print(table(results, args))
    print()
    print(tools_note(args))
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "settings": {
            "duration_s": args.duration,
            "connections": args.connections,
            "wrk_threads": args.threads,
            "cpu_limit": args.cpu_limit,
            "warmup_s": args.warmup,
            "load_ratio": args.load_ratio,
            "max_tool": "wrk" if args.wrk else "loadgen",
            "hot_cache": not args.no_cache,
            "store": args.store,
        },  # fmt: skip
        "notes": tools_note(args),
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nresults written to {args.output}")


if __name__ == "__main__":
    main()
