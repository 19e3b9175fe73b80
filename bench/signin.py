"""Benchmark whole sign-ins: local password, LDAP connector, OIDC connector, side by side in one run.

`python bench/signin.py` (from the repository root; `--help`, bench/README.md). It starts, in a temp dir:
a real slapd and a real node-oidc-provider (the test suite's fixtures, tests/ldap_server.py and
tests/oidc_upstream.py) and one `iam serve` (role all, SQLite) with both as connectors and one local user.
Then, per scenario, `--workers` browsers (httpx clients, fresh cookies every time: no SSO) each run sign-in
after sign-in for `--duration` seconds:

- local: authorize -> sign-in page -> password form -> handoff -> the client's redirect with a code
- ldap:  authorize -> sign-in page -> the directory's form -> bind as the person -> ... -> code
- oidc:  authorize -> sign-in page -> the provider's page -> its sign-in -> callback -> ... -> code

A sign-in counts once the browser holds the code (no token redemption: that is the same for all three).
Prints sign-ins/s and per-sign-in p50/p99 latency, and writes bench/results/signin.json.

- burst: token introspection at a steady `--introspection-rate` (open loop: paced wrk, bench/wrk.lua, or
  bench/loadgen.py without wrk, as bench/run.py paces; a client credentials token), first alone, then beside
  local sign-ins: its p99 both ways, and the sign-ins per second of the server's CPU time (argon2id at iam's
  parameters). With `--cpu-limit N` the server runs under a cgroup CPU limit (tests/cpu_limit.py), as in a
  container with `resources.limits.cpu: N`, and the burst says how long the kernel held it back for it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

from run import Scenario, cpu_seconds, run_paced  # noqa: E402  (bench/run.py)

from tests import ldap_server  # noqa: E402  (the suite's real upstreams)
from tests.cpu_limit import CgroupUnavailable, cpu_limited, throttled_us  # noqa: E402
from tests.oidc_upstream import ALICE, running_upstream  # noqa: E402
from tests.postgres import free_port  # noqa: E402
from tests.server import iam, serve, write_config  # noqa: E402

PROBE_SECRET = "bench-probe-secret-0123456789abcdef"
CALLBACK = "http://127.0.0.1:9/cb"  # the client's redirect URI: never fetched, the browser stops there
PASSWORD = "bench local password 1234"
HIDDEN = re.compile(r'<input type="hidden" name="([^"]+)" value="([^"]*)"')


def percentile(values: list[float], pct: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(pct / 100 * (len(ordered) - 1))))]


class SignIns:
    def __init__(self, base: str, upstream, ldap) -> None:
        self.base, self.upstream, self.ldap = base, upstream, ldap

    async def _page(self, http: httpx.AsyncClient) -> httpx.Response:
        params = {"client_id": "bench", "redirect_uri": CALLBACK, "response_type": "code", "scope": "openid groups",
                  "state": secrets.token_urlsafe(8), "code_challenge": "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
                  "code_challenge_method": "S256"}
        response = await http.get(f"{self.base}/oauth/v2/authorize?{urlencode(params)}")
        return await self._follow(http, response)

    async def _follow(self, http: httpx.AsyncClient, response: httpx.Response) -> httpx.Response:
        for _ in range(10):
            location = response.headers.get("location")
            if response.status_code not in (302, 303) or location is None or location.startswith(CALLBACK):
                return response
            response = await http.get(urljoin(str(response.url), location))
        raise RuntimeError("too many redirects")

    def _code(self, response: httpx.Response) -> None:
        location = response.headers.get("location", "")
        if not location.startswith(CALLBACK) or "code" not in dict(parse_qsl(urlsplit(location).query)):
            raise RuntimeError(f"no code: {response.status_code} {response.text[:200]}")

    async def local(self, http: httpx.AsyncClient) -> None:
        page = await self._page(http)
        form = dict(HIDDEN.findall(page.text))
        done = await http.post(f"{self.base}/authn/login", data={**form, "username": "bench", "password": PASSWORD})
        self._code(await self._follow(http, done))

    def _link(self, page: httpx.Response, name: str) -> str:
        href = re.search(rf'href="([^"]+)">Sign in with {re.escape(name)}<', page.text)
        if href is None:
            raise RuntimeError(f"no link to {name}")
        return urljoin(str(page.url), href.group(1).replace("&amp;", "&"))

    async def ldap_connector(self, http: httpx.AsyncClient) -> None:
        page = await self._page(http)
        form_page = await http.get(self._link(page, "Example Directory"))
        form = dict(HIDDEN.findall(form_page.text))
        done = await http.post(f"{self.base}/authn/connectors/ad/login",
                               data={**form, "username": "alice", "password": self.ldap.password_of("alice")})
        self._code(await self._follow(http, done))

    async def oidc_connector(self, http: httpx.AsyncClient) -> None:
        page = await self._page(http)
        to_upstream = await http.get(self._link(page, "Contoso"))
        callback = f"{self.base}/authn/connectors/corp/callback"
        async with httpx.AsyncClient() as at_upstream:
            params = await self.upstream.sign_in(at_upstream, to_upstream.headers["location"], ALICE.username,
                                                 ALICE.password, redirect_uri=callback)
        done = await http.get(callback, params=params)
        self._code(await self._follow(http, done))


async def run(scenario, workers: int, duration: float) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration

    async def worker() -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            started = time.perf_counter()
            async with httpx.AsyncClient(timeout=30) as http:  # a new browser: no SSO session
                try:
                    await scenario(http)
                except (httpx.HTTPError, RuntimeError):
                    errors += 1
                    continue
            latencies.append(time.perf_counter() - started)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return summary("sign_ins", latencies, errors, time.monotonic() - started)


async def introspection(base: str, token: str, rate: float, duration: float) -> dict:
    """Open-loop introspection of one token at `rate` (bench/run.py's paced run): latencies from due times."""
    basic = base64.b64encode(f"probe:{PROBE_SECRET}".encode()).decode()
    scenario = Scenario("introspect", "POST", "/oauth/v2/introspect", {
        "Authorization": f"Basic {basic}", "Content-Type": "application/x-www-form-urlencoded"}, f"token={token}")
    how = argparse.Namespace(wrk=shutil.which("wrk"), connections=8)
    return await asyncio.to_thread(run_paced, base, scenario, how, round(duration), rate)


async def burst(sign_ins: SignIns, server_pid: int, rate: float, workers: int, duration: float,
                cgroup: Path | None) -> dict:
    """Introspection p99 alone, then beside `workers` browsers signing in with a password, in one run."""
    async with httpx.AsyncClient() as http:
        issued = await http.post(f"{sign_ins.base}/oauth/v2/token", data={"grant_type": "client_credentials"},
                                 auth=("probe", PROBE_SECRET))
    token = issued.raise_for_status().json()["access_token"]
    quiet = await introspection(sign_ins.base, token, rate, duration)
    cpu_before, held_before = cpu_seconds(server_pid), throttled_us(cgroup) if cgroup else 0
    beside, signed = await asyncio.gather(introspection(sign_ins.base, token, rate, duration),
                                          run(sign_ins.local, workers, duration))
    cpu = cpu_seconds(server_pid) - cpu_before
    return {"introspection_alone": quiet, "introspection_beside_sign_ins": beside, "sign_ins": signed,
            "server_cpu_seconds": round(cpu, 2),
            # how long the kernel held the server back for its CPU limit (--cpu-limit) during the burst
            "throttled_ms": None if cgroup is None else round((throttled_us(cgroup) - held_before) / 1000),
            # the introspection's own CPU is in `cpu` too: this is a lower bound on sign-ins per core-second
            "sign_ins_per_cpu_second": round(signed["sign_ins"] / cpu, 2) if cpu else None}


def summary(unit: str, latencies: list[float], errors: int, elapsed: float) -> dict:
    """A closed-loop run's figures: how many `unit`s, errors, per second, p50 and p99 in ms."""
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    return {unit: len(latencies), "errors": errors, "seconds": round(elapsed, 2),
            "per_second": round(len(latencies) / elapsed, 2),
            "p50_ms": None if p50 is None else round(p50 * 1000, 1),
            "p99_ms": None if p99 is None else round(p99 * 1000, 1)}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=15, help="seconds per scenario (default 15)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent browsers (default 8)")
    parser.add_argument("--scenarios", default="local,ldap,oidc,burst")
    parser.add_argument("--introspection-rate", type=float, default=500,
                        help="burst: introspections per second, alone and beside the sign-ins (default 500)")
    parser.add_argument("--cpu-limit", type=float, default=None,
                        help="run the server under a cgroup CPU limit of this many CPUs, as a container's "
                             "resources.limits.cpu (needs root; default: no limit)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="iam-bench-signin-") as tmp, contextlib.ExitStack() as stack:
        tmp_path = Path(tmp)
        ldap = stack.enter_context(ldap_server.running())
        upstream = stack.enter_context(running_upstream(tmp_path))
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        upstream.add_client("iam-bench", "bench-upstream-secret-0123456789", [f"{base}/authn/connectors/corp/callback"])
        ldap_config = ldap.connector_config(id="ad").model_dump(mode="json")
        ldap_config["bind_password"] = "${LDAP_BIND_PASSWORD}"
        config = write_config(tmp_path, issuer=base, log_level="warning", purge_interval=0, clients=[{
            "client_id": "bench", "token_endpoint_auth_method": "none", "redirect_uris": [CALLBACK],
            "scope": "openid groups"}, {
            "client_id": "probe", "client_secret": "${PROBE_SECRET}", "grant_types": ["client_credentials"],
            "scope": "api:read", "introspection": True}], connectors=[
            {"id": "corp", "type": "oidc", "name": "Contoso", "issuer": upstream.issuer, "client_id": "iam-bench",
             "client_secret": "${UPSTREAM_SECRET}", "scopes": ["openid", "email", "profile", "groups"]},
            ldap_config])
        env = {"IAM_CONFIG": str(config), "SERVICE_ROLE": "all", "IAM_KEYS_DIR": str(tmp_path / "keys"),
               "UPSTREAM_SECRET": "bench-upstream-secret-0123456789", "PROBE_SECRET": PROBE_SECRET,
               "LDAP_BIND_PASSWORD": ldap.service_password,
               **{f"IAM_{name.upper()}_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/{name}.db"
                  for name in ("authn", "token", "users")}}
        added = iam("users", "add", "--username", "bench", "--password-stdin", env=env, cwd=tmp_path,
                    input=PASSWORD + "\n")
        if added.returncode != 0:
            raise SystemExit(f"iam users add failed: {added.stderr}")
        try:
            cgroup = None if args.cpu_limit is None else stack.enter_context(cpu_limited(args.cpu_limit))
        except CgroupUnavailable as error:
            raise SystemExit(f"--cpu-limit: {error}") from error
        _, server = stack.enter_context(serve(env, tmp_path, port=port, cgroup=cgroup))
        sign_ins = SignIns(base, upstream, ldap)
        chosen = {"local": sign_ins.local, "ldap": sign_ins.ldap_connector, "oidc": sign_ins.oidc_connector}
        results, bursts = {}, None
        for name in args.scenarios.split(","):
            if name == "burst":
                bursts = asyncio.run(burst(sign_ins, server.pid, args.introspection_rate, args.workers, args.duration,
                                           cgroup))
                print(f"burst: {bursts}", file=sys.stderr)
                continue
            asyncio.run(run(chosen[name], 1, 1))  # warm-up: connections, discovery, JWKS
            results[name] = asyncio.run(run(chosen[name], args.workers, args.duration))
            print(f"{name}: {results[name]}", file=sys.stderr)
    print(f"\n{'scenario':<10}{'sign-ins/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'n':>7}{'errors':>8}")
    for name, result in results.items():
        print(f"{name:<10}{result['per_second']:>12}{result['p50_ms']!s:>10}{result['p99_ms']!s:>10}"
              f"{result['sign_ins']:>7}{result['errors']:>8}")
    if bursts is not None:
        alone, beside = bursts["introspection_alone"], bursts["introspection_beside_sign_ins"]
        print(f"\nburst: introspection at {args.introspection_rate:g}/s, p50 / p99 ms: alone {alone['p50_ms']} / "
              f"{alone['p99_ms']}, beside {bursts['sign_ins']['per_second']} sign-ins/s {beside['p50_ms']} / "
              f"{beside['p99_ms']} (errors {alone['errors']}, {beside['errors']}); "
              f"{bursts['sign_ins_per_cpu_second']} sign-ins per server CPU second"
              + ("" if cgroup is None else f"; under a limit of {args.cpu_limit:g} CPUs, throttled "
                                           f"{bursts['throttled_ms']} ms"))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "signin.json").write_text(json.dumps({
        "workers": args.workers, "duration": args.duration, "cpus": os.cpu_count(), "cpu_limit": args.cpu_limit,
        "python": platform.python_version(),
        "results": results, "burst": bursts}, indent=2))


if __name__ == "__main__":
    main()
