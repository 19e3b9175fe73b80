"""Workloads without static secrets, end to end over HTTP: real `iam serve` processes, a Kubernetes
service-account issuer serving its discovery document and JWKS on a real port (tests/workload_issuer.py), a
SPIFFE trust bundle in a file; one store shared by two replicas (PostgreSQL) refuses a replayed assertion."""

from __future__ import annotations

import asyncio
from contextlib import ExitStack

import asyncpg
import httpx
import pytest

from tests.assertions import assertion, client_keys, form, public_jwks
from tests.conftest import ISSUER, basic, create_database
from tests.server import serve, token_role_env
from tests.workload_issuer import ServiceAccountIssuer, SpiffeIssuer

pytestmark = pytest.mark.slow

TOKEN = f"{ISSUER}/oauth/v2/token"
KEYS = client_keys()
SPIFFE = SpiffeIssuer()
EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
SERVICE = {"grant_types": ["client_credentials"], "scope": "api:read", "audience": ["https://api.test"]}


def workload_clients(kube: ServiceAccountIssuer, bundle: str) -> list[dict]:
    from tests.conftest import client_config

    return [
        *client_config(),
        {"client_id": "signer", "token_endpoint_auth_method": "private_key_jwt", "jwks": public_jwks(KEYS), **SERVICE},
        {"client_id": "billing-api", "token_endpoint_auth_method": "workload_identity", **SERVICE,
         "workload_identities": [{"issuer": kube.issuer, "subject": "system:serviceaccount:billing:api",
                                  "audience": ISSUER}]},
        {"client_id": "orders-api", "token_endpoint_auth_method": "private_key_jwt", "jwks": public_jwks(KEYS),
         "grant_types": [EXCHANGE], "scope": "api:read",
         "token_exchange": {"audiences": ["https://inventory.test"], "subject_audiences": ["https://api.test"]}},
        {"client_id": "spiffe-worker", "token_endpoint_auth_method": "workload_identity", **SERVICE,
         "workload_identities": [{"issuer": "spiffe://example.org", "subject": "spiffe://example.org/worker",
                                  "jwks_file": bundle}]},
    ]


def get_token(base: str, data: dict[str, str]) -> httpx.Response:
    return httpx.post(f"{base}/oauth/v2/token", data={"grant_type": "client_credentials", **data}, timeout=10)


def introspect(base: str, token: str) -> dict:
    return httpx.post(f"{base}/oauth/v2/introspect", data={"token": token}, headers=basic("svc-basic"),
                      timeout=10).json()


def test_each_key_based_method_through_a_real_server(tmp_path, kube):
    bundle = SPIFFE.write_bundle(tmp_path / "bundle.json")
    env = token_role_env(tmp_path, clients=workload_clients(kube, str(bundle)))
    with serve(env, tmp_path) as (base, _):
        # private_key_jwt
        signed = assertion(KEYS["ES256"], "signer", TOKEN, alg="ES256")
        issued = get_token(base, form(signed))
        assert issued.status_code == 200, issued.text
        assert introspect(base, issued.json()["access_token"])["client_id"] == "signer"
        replay = get_token(base, form(signed))
        assert replay.status_code == 401 and replay.json()["error"] == "invalid_client"
        # a projected service-account token, its issuer's keys found by discovery over HTTP
        projected = kube.token("billing", "api", [ISSUER])
        issued = get_token(base, form(projected, "billing-api"))
        assert issued.status_code == 200, issued.text
        assert introspect(base, issued.json()["access_token"])["sub"] == "billing-api"
        assert kube.hits["/.well-known/openid-configuration"] == 1 and kube.hits["/openid/v1/jwks"] == 1
        for _ in range(3):  # the same projected token again: keys from the cache, nothing fetched
            assert get_token(base, form(projected, "billing-api")).status_code == 200
        assert kube.hits["/openid/v1/jwks"] == 1
        wrong = get_token(base, form(kube.token("billing", "worker", [ISSUER]), "billing-api"))
        assert wrong.status_code == 401
        # a SPIFFE JWT-SVID, verified with the trust bundle file
        issued = get_token(base, form(SPIFFE.svid("/worker", [ISSUER]), "spiffe-worker"))
        assert issued.status_code == 200, issued.text
        # a resource indicator: one of the client's audiences, else invalid_target
        narrowed = get_token(base, {**form(kube.token("billing", "api", [ISSUER]), "billing-api"),
                                    "resource": "https://api.test"})
        assert narrowed.status_code == 200
        other = get_token(base, {**form(kube.token("billing", "api", [ISSUER]), "billing-api"),
                                 "resource": "https://other.test"})
        assert other.status_code == 400 and other.json()["error"] == "invalid_target"
        # token exchange (RFC 8693): the API that received the workload's token trades it for the next API's
        exchanged = httpx.post(f"{base}/oauth/v2/token", timeout=10, data={
            "grant_type": EXCHANGE, "subject_token": narrowed.json()["access_token"],
            "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "audience": "https://inventory.test", **form(assertion(KEYS["RS256"], "orders-api", TOKEN))})
        assert exchanged.status_code == 200, exchanged.text
        claims = introspect(base, exchanged.json()["access_token"])
        assert claims["sub"] == "billing-api" and claims["aud"] == "https://inventory.test"
        assert claims["client_id"] == "orders-api"


def test_a_replayed_assertion_fails_on_the_other_replica(tmp_path, kube, postgres_server):
    """Two `iam serve` replicas on one PostgreSQL token store: the jti used at A is refused at B, and at A
    again; and the same assertion sent to both at once is honoured once."""
    database = asyncio.run(create_database(postgres_server))
    url = f"postgresql+asyncpg://{postgres_server.split('://', 1)[1]}/{database}"
    bundle = SPIFFE.write_bundle(tmp_path / "bundle.json")
    with ExitStack() as stack:
        bases = []
        for name in ("a", "b"):
            directory = tmp_path / name
            directory.mkdir()
            env = {**token_role_env(directory, clients=workload_clients(kube, str(bundle))),
                   "IAM_TOKEN_DATABASE_URL": url}
            bases.append(stack.enter_context(serve(env, directory))[0])
        a, b = bases
        signed = assertion(KEYS["RS256"], "signer", TOKEN)
        assert get_token(a, form(signed)).status_code == 200
        for base in (b, a):
            replay = get_token(base, form(signed))
            assert replay.status_code == 401 and replay.json()["error"] == "invalid_client"

        async def race() -> list[int]:
            raced = form(assertion(KEYS["RS256"], "signer", TOKEN))
            async with httpx.AsyncClient(timeout=10) as http:
                answers = await asyncio.gather(*(
                    http.post(f"{base}/oauth/v2/token", data={"grant_type": "client_credentials", **raced})
                    for base in (a, b, a, b)))
            return sorted(answer.status_code for answer in answers)

        assert asyncio.run(race()) == [200, 401, 401, 401]

    async def issued() -> int:
        conn = await asyncpg.connect(f"{postgres_server}/{database}")
        try:
            return await conn.fetchval("SELECT count(*) FROM access_tokens")
        finally:
            await conn.close()

    assert asyncio.run(issued()) == 2  # one per assertion, none for a replay
