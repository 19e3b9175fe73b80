"""Benchmark forward-auth (`GET /oauth/v2/phantom`) with DPoP proofs (RFC 9449 §7) and TLS client certificates
(RFC 8705 §3) beside a bearer token, in one run: `bearer` (the hot path), `dpop_es256` and `dpop_eddsa` (a
DPoP-bound token, a new proof per request: its signature verified, its jti recorded in the token store, as every
proof must be), `mtls` (a certificate-bound token with the client's certificate in the `ssl-client-cert` header,
URL-encoded PEM as nginx forwards it: parsed and hashed per request).

`python bench/dpop.py` (from the repository root; `--help`). It starts, in a temp dir, a throw-away PostgreSQL
(tests/postgres.py) and one `iam serve` (role token), gets one token per scenario, and signs the proofs before
the run (the client's signing is not measured). Then, per scenario, `--connections` keep-alive clients each
send check after check (closed loop) for `--duration` seconds. Prints checks/s and p50/p99 and writes
bench/results/dpop.json.
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
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.client_auth import _create_database, run  # noqa: E402
from tests.dpop import DPoPClient  # noqa: E402
from tests.pki import TestCA  # noqa: E402
from tests.postgres import cluster, free_port  # noqa: E402
from tests.server import serve, write_config  # noqa: E402

SECRET = secrets.token_urlsafe(24)
API = "https://api.bench/orders/7"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10, help="seconds per scenario (default 10)")
    parser.add_argument("--connections", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--proofs", type=int, default=20000, help="proofs signed before each DPoP run (default 20000)")
    parser.add_argument("--scenarios", default="bearer,dpop_es256,dpop_eddsa,mtls")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="iam-bench-dpop-") as tmp, contextlib.ExitStack() as stack:
        tmp_path = Path(tmp)
        postgres = stack.enter_context(cluster())
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        pki = TestCA(tmp_path / "pki")
        certificate = pki.client("bench-mtls", "CN=bench-mtls,O=Bench")
        config = write_config(tmp_path, issuer=base, log_level="warning", purge_interval=0, clients=[
            {"client_id": "bench", "client_secret": "${BENCH_SECRET}", "grant_types": ["client_credentials"],
             "scope": "api:read", "access_token_ttl": 3600},
            {"client_id": "bench-mtls", "token_endpoint_auth_method": "tls_client_auth",
             "tls_client_auth_subject_dn": "CN=bench-mtls,O=Bench", "grant_types": ["client_credentials"],
             "scope": "api:read", "access_token_ttl": 3600, "tls_client_certificate_bound_access_tokens": True}],
            mtls={"trusted_proxies": ["127.0.0.1/32"], "ca_file": str(pki.path)})
        database = asyncio.run(_create_database(postgres))
        env = {"IAM_CONFIG": str(config), "SERVICE_ROLE": "token", "IAM_KEYS_DIR": str(tmp_path / "keys"),
               "BENCH_SECRET": SECRET, "IAM_TOKEN_DATABASE_URL": f"postgresql+asyncpg://{database}",
               **{var: "http://127.0.0.1:9" for var in ("IAM_USERS_URL", "IAM_AUTHN_URL")}}
        stack.enter_context(serve(env, tmp_path, port=port))
        basic = {"Authorization": "Basic " + base64.b64encode(f"bench:{SECRET}".encode()).decode()}
        original = {"X-Original-Method": "GET", "X-Original-URL": API}

        def token(key: DPoPClient | None) -> str:
            headers = {**basic, "DPoP": key.proof("POST", f"{base}/oauth/v2/token")} if key else basic
            response = httpx.post(f"{base}/oauth/v2/token", data={"grant_type": "client_credentials"},
                                  headers=headers)
            response.raise_for_status()
            return str(response.json()["access_token"])

        def proven(alg: str) -> Callable[[], tuple[dict, dict] | None]:
            key = DPoPClient(alg)
            bound = token(key)
            print(f"signing {args.proofs} {alg} proofs ...", file=sys.stderr)
            proofs = iter([key.proof("GET", API, access_token=bound) for _ in range(args.proofs)])
            auth = {"Authorization": f"DPoP {bound}", **original}
            return lambda: (lambda p: None if p is None else ({}, {**auth, "DPoP": p}))(next(proofs, None))

        def certificate_bound() -> Callable[[], tuple[dict, dict] | None]:
            presented = {"ssl-client-cert": certificate.escaped_pem}  # as the gateway forwards it
            response = httpx.post(f"{base}/oauth/v2/token", headers=presented,
                                  data={"grant_type": "client_credentials", "client_id": "bench-mtls"})
            response.raise_for_status()
            headers = {"Authorization": f"Bearer {response.json()['access_token']}", **presented}
            return lambda: ({}, headers)

        bearer = {"Authorization": f"Bearer {token(None)}"}
        makers: dict[str, Callable[[], Callable[[], tuple[dict, dict] | None]]] = {
            "bearer": lambda: lambda: ({}, bearer),
            "dpop_es256": lambda: proven("ES256"),
            "dpop_eddsa": lambda: proven("EdDSA"),
            "mtls": certificate_bound,
        }
        phantom = f"{base}/oauth/v2/phantom"
        results = {}
        for name in args.scenarios.split(","):
            requests = makers[name]()
            asyncio.run(run(phantom, requests, 2, 1, "GET", "checks"))  # warm-up: connections, the hot cache
            results[name] = asyncio.run(run(phantom, requests, args.connections, args.duration, "GET", "checks"))
            print(f"{name}: {results[name]}", file=sys.stderr)
    print(f"\n{'scenario':<14}{'checks/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'n':>8}{'errors':>8}")
    for name, result in results.items():
        print(f"{name:<14}{result['per_second']:>10}{result['p50_ms']!s:>9}{result['p99_ms']!s:>9}"
              f"{result['checks']:>8}{result['errors']:>8}")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "dpop.json").write_text(json.dumps({
        "connections": args.connections, "duration": args.duration, "cpus": os.cpu_count(),
        "python": platform.python_version(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
