"""Benchmark client_credentials by client authentication method, side by side in one run: client_secret_basic,
private_key_jwt (ES256, a new assertion and jti per request) and workload_identity (a projected Kubernetes
service-account token, RS256, the same token every time as a pod sends it).

`python bench/client_auth.py` (from the repository root; `--help`, bench/README.md). It starts, in a temp
dir: a throw-away PostgreSQL (the test suite's tests/postgres.py), the suite's service-account issuer
(tests/workload_issuer.py: discovery and JWKS over real HTTP) and one `iam serve` (role token). Then, per
scenario, `--connections` keep-alive clients each send token request after token request (closed loop) for
`--duration` seconds. The private_key_jwt assertions are signed before the run, so the client's signing is
not measured. Prints tokens/s and p50/p99, how often iam fetched the issuer's keys (once: they are cached),
and writes bench/results/client_auth.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.signin import summary  # noqa: E402
from tests.assertions import assertion, client_keys, form, public_jwks  # noqa: E402
from tests.postgres import cluster, free_port  # noqa: E402
from tests.server import serve, write_config  # noqa: E402
from tests.workload_issuer import ServiceAccountIssuer  # noqa: E402

SECRET = secrets.token_urlsafe(24)
SERVICE = {"grant_types": ["client_credentials"], "scope": "api:read", "access_token_ttl": 3600}


async def run(url: str, next_request: Callable[[], tuple[dict, dict] | None], connections: int,
              duration: float, method: str = "POST", unit: str = "tokens") -> dict:
    """`connections` clients, each sending `next_request()`'s (form, headers) after the last answer (closed loop)."""
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + duration

    async def worker() -> None:
        nonlocal errors
        async with httpx.AsyncClient(timeout=10) as http:
            while time.monotonic() < deadline:
                request = next_request()
                if request is None:  # out of pre-signed assertions
                    return
                data, headers = request
                started = time.perf_counter()
                try:
                    response = await http.request(method, url, data=data or None, headers=headers)
                except httpx.HTTPError:
                    errors += 1
                    continue
                if response.status_code != 200:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return summary(unit, latencies, errors, time.monotonic() - started)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per scenario (default 10)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--assertions", type=int, default=20000,
                        help="private_key_jwt assertions signed before the run (default 20000)")
    parser.add_argument("--scenarios", default="client_secret_basic,private_key_jwt,workload_identity")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    keys = client_keys()
    with tempfile.TemporaryDirectory(prefix="iam-bench-auth-") as tmp, contextlib.ExitStack() as stack:
        tmp_path = Path(tmp)
        postgres = stack.enter_context(cluster())
        kube = stack.enter_context(ServiceAccountIssuer())
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        token_url = f"{base}/oauth/v2/token"
        config = write_config(tmp_path, issuer=base, log_level="warning", purge_interval=0, clients=[
            {"client_id": "basic", "client_secret": "${BENCH_SECRET}", **SERVICE},
            {"client_id": "signer", "token_endpoint_auth_method": "private_key_jwt", "jwks": public_jwks(keys),
             **SERVICE},
            {"client_id": "billing-api", "token_endpoint_auth_method": "workload_identity", **SERVICE,
             "workload_identities": [{"issuer": kube.issuer, "subject": "system:serviceaccount:billing:api"}]},
        ])
        database = asyncio.run(_create_database(postgres))
        env = {"IAM_CONFIG": str(config), "SERVICE_ROLE": "token", "IAM_KEYS_DIR": str(tmp_path / "keys"),
               "BENCH_SECRET": SECRET, "IAM_TOKEN_DATABASE_URL": f"postgresql+asyncpg://{database}",
               **{var: "http://127.0.0.1:9" for var in ("IAM_USERS_URL", "IAM_AUTHN_URL")}}
        stack.enter_context(serve(env, tmp_path, port=port))

        print(f"signing {args.assertions} ES256 assertions ...", file=sys.stderr)
        signed = iter([form(assertion(keys["ES256"], "signer", token_url, alg="ES256", lifetime=290))
                       for _ in range(args.assertions)])
        projected = form(kube.token("billing", "api", [base]), "billing-api")
        basic_auth = "Basic " + base64.b64encode(f"basic:{SECRET}".encode()).decode()
        grant = {"grant_type": "client_credentials"}
        requests: dict[str, Callable[[], tuple[dict, dict] | None]] = {
            "client_secret_basic": lambda: (grant, {"Authorization": basic_auth}),
            "private_key_jwt": lambda: (lambda f: None if f is None else ({**grant, **f}, {}))(next(signed, None)),
            "workload_identity": lambda: ({**grant, **projected}, {}),
        }
        results = {}
        for name in args.scenarios.split(","):
            asyncio.run(run(token_url, requests[name], 2, 1))  # warm-up: connections, the issuer's keys
            results[name] = asyncio.run(run(token_url, requests[name], args.connections, args.duration))
            print(f"{name}: {results[name]}", file=sys.stderr)
        fetches = dict(kube.hits)
    print(f"\n{'scenario':<22}{'tokens/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'n':>8}{'errors':>8}")
    for name, result in results.items():
        print(f"{name:<22}{result['per_second']:>10}{result['p50_ms']!s:>9}{result['p99_ms']!s:>9}"
              f"{result['tokens']:>8}{result['errors']:>8}")
    print(f"\nfetches of the cluster issuer's discovery and JWKS during the run: {fetches}")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "client_auth.json").write_text(json.dumps({
        "connections": args.connections, "duration": args.duration, "cpus": os.cpu_count(),
        "python": platform.python_version(), "issuer_fetches": fetches, "results": results}, indent=2))


async def _create_database(server: str) -> str:
    from tests.conftest import create_database

    name = await create_database(server)
    return f"{server.split('://', 1)[1]}/{name}"


if __name__ == "__main__":
    main()
