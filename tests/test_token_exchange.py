"""Token exchange (RFC 8693): an API trades the token it received for one scoped to the next API it calls,
narrowed, never widened; `act` records delegation; revoked with its source grant. SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import json

import pytest
from joserfc import jwt
from joserfc.jwk import ECKey
from sqlalchemy import func, select, update

from iam.token.store import access_tokens
from tests.conftest import ISSUER, basic, client_config, make_settings
from tests.oauth import code_flow, redeem

GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
ACCESS = "urn:ietf:params:oauth:token-type:access_token"
JWT = "urn:ietf:params:oauth:token-type:jwt"
ORDERS_SECRET = "orders-secret-0123456789abcdef"
INVENTORY = "https://inventory.test"


@pytest.fixture
def settings(tmp_path, store_urls, kube):
    orders = {
        "client_id": "orders-api", "client_secret": ORDERS_SECRET, "scope": "api:read inventory:read",
        "grant_types": ["client_credentials", GRANT], "access_token_ttl": 900,
        "token_exchange": {
            "audiences": [INVENTORY, "https://shipping.test"],
            "subject_audiences": [ISSUER],  # webapp's tokens (no audience configured: the issuer)
            "workload_identities": [{"issuer": kube.issuer, "subject": "system:serviceaccount:billing:api"}],
        },
    }
    return make_settings(tmp_path, store_urls, clients=[*client_config(), orders])


def orders() -> dict[str, str]:
    return basic("orders-api", ORDERS_SECRET)


async def user_tokens(client, alice) -> dict:
    params, verifier, _ = await code_flow(client, scope="openid api:read offline_access")
    response = await redeem(client, params["code"], verifier)
    assert response.status_code == 200, response.text
    return response.json()


async def exchange(client, subject_token, subject_type=ACCESS, headers=None, **params):
    data = {"grant_type": GRANT, "subject_token": subject_token, "subject_token_type": subject_type, **params}
    return await client.post("/oauth/v2/token", data=data, headers=headers or orders())


async def introspect(client, token) -> dict:
    return (await client.post("/oauth/v2/introspect", data={"token": token}, headers=basic("svc-basic"))).json()


async def rows(app) -> int:
    async with app.state.iam.token.store.engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(access_tokens))).scalar_one()


async def own_token(client) -> str:
    response = await client.post("/oauth/v2/token", data={"grant_type": "client_credentials"}, headers=orders())
    return response.json()["access_token"]


async def test_an_api_exchanges_a_users_token_for_the_next_api(client, alice):
    source = await user_tokens(client, alice)
    response = await exchange(client, source["access_token"], audience=INVENTORY)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["issued_token_type"] == ACCESS and body["token_type"] == "Bearer"
    assert body["scope"] == "api:read"  # the subject's scope, within the exchanging client's
    assert body["expires_in"] <= 900
    claims = await introspect(client, body["access_token"])
    assert claims["active"] and claims["sub"] == alice and claims["aud"] == INVENTORY
    assert claims["client_id"] == "orders-api" and "act" not in claims


async def jwt_form(client, token: str) -> str:
    """The JWT the gateway hands an API for `token` (introspection's RFC 9701-style JWT form)."""
    return (await client.post("/oauth/v2/introspect", data={"token": token},
                              headers={**basic("svc-basic"), "Accept": "application/jwt"})).text


async def test_the_api_may_exchange_the_jwt_it_received_for_the_token(client, alice):
    """An API behind the gateway never sees the opaque token: the JWT it got stands for the same live token."""
    source = await user_tokens(client, alice)
    response = await exchange(client, await jwt_form(client, source["access_token"]), audience=INVENTORY)
    assert response.status_code == 200, response.text
    claims = await introspect(client, response.json()["access_token"])
    assert claims["active"] and claims["sub"] == alice and claims["aud"] == INVENTORY
    # revoking the source grant ends what was exchanged from its JWT too
    await client.post("/oauth/v2/revoke", data={"token": source["refresh_token"]}, headers=basic("webapp"))
    assert (await introspect(client, response.json()["access_token"])) == {"active": False}


async def test_it_is_revoked_with_its_source_grant(client, alice):
    source = await user_tokens(client, alice)
    exchanged = (await exchange(client, source["access_token"], audience=INVENTORY)).json()["access_token"]
    revoked = await client.post("/oauth/v2/revoke", data={"token": source["refresh_token"]}, headers=basic("webapp"))
    assert revoked.status_code == 200
    assert (await introspect(client, exchanged)) == {"active": False}


async def test_delegation_records_act_nested_along_a_chain(client, alice):
    source = await user_tokens(client, alice)
    actor = await own_token(client)
    first = await exchange(client, source["access_token"], resource=INVENTORY, actor_token=actor,
                           actor_token_type=ACCESS)
    assert first.status_code == 200, first.text
    token = first.json()["access_token"]
    claims = await introspect(client, token)
    assert claims["act"] == {"sub": "orders-api", "client_id": "orders-api"} and claims["sub"] == alice
    second = await exchange(client, token, audience="https://shipping.test", actor_token=await own_token(client),
                            actor_token_type=ACCESS)
    assert second.status_code == 200, second.text
    chained = await introspect(client, second.json()["access_token"])
    assert chained["act"] == {"sub": "orders-api", "client_id": "orders-api",
                              "act": {"sub": "orders-api", "client_id": "orders-api"}}
    assert chained["aud"] == "https://shipping.test"


async def test_without_a_target_the_token_is_for_the_policys_audiences(client, alice):
    source = await user_tokens(client, alice)
    body = (await exchange(client, source["access_token"])).json()
    assert (await introspect(client, body["access_token"]))["aud"] == [INVENTORY, "https://shipping.test"]


async def test_a_workload_token_is_a_subject_when_the_policy_trusts_it(client, kube):
    token = kube.token("billing", "api", [ISSUER])
    response = await exchange(client, token, JWT, audience=INVENTORY, scope="inventory:read")
    assert response.status_code == 200, response.text
    claims = await introspect(client, response.json()["access_token"])
    assert claims["sub"] == "system:serviceaccount:billing:api" and claims["scope"] == "inventory:read"


async def test_the_exchanged_token_never_outlives_its_subject(client, app, alice):
    source = await user_tokens(client, alice)
    async with app.state.iam.token.store.engine.begin() as conn:
        row = (await conn.execute(select(access_tokens.c.expires_at))).scalar_one()
        await conn.execute(update(access_tokens).values(expires_at=row - 3600 + 60))  # a minute left
    body = (await exchange(client, source["access_token"], audience=INVENTORY)).json()
    assert body["expires_in"] <= 60


@pytest.mark.parametrize("case", [
    "revoked-subject", "expired-subject", "other-clients-token", "wider-scope", "audience-outside-policy",
    "resource-outside-policy", "actor-does-not-verify", "actor-of-another-client", "jwt-of-a-revoked-token",
    "jwt-signed-elsewhere", "jwt-with-a-changed-claim", "jwt-of-an-id-token",
    "untrusted-workload", "workload-wrong-audience", "unsupported-type", "no-subject-type", "other-token-type",
])
async def test_bad_exchanges_issue_nothing(client, app, alice, kube, case):
    source = await user_tokens(client, alice)
    subject = source["access_token"]
    other = (await client.post("/oauth/v2/token", data={"grant_type": "client_credentials"},
                               headers=basic("svc-basic"))).json()["access_token"]  # aud https://api.test
    # While it is live; only for the JWT cases (it fills the hot cache, which the others bypass by editing rows).
    subject_jwt = await jwt_form(client, subject) if case.startswith("jwt-") else ""
    if case == "revoked-subject":
        await client.post("/oauth/v2/revoke", data={"token": subject}, headers=basic("webapp"))
    if case == "expired-subject":
        async with app.state.iam.token.store.engine.begin() as conn:
            await conn.execute(update(access_tokens).values(expires_at=1))
    if case == "jwt-of-a-revoked-token":
        await client.post("/oauth/v2/revoke", data={"token": subject}, headers=basic("webapp"))
    elsewhere = changed = ""
    if case.startswith("jwt-"):
        header, payload, signature = subject_jwt.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        elsewhere = jwt.encode({"alg": "ES256", "typ": "at+jwt"}, claims, ECKey.generate_key("P-256"))
        wider = json.dumps({**claims, "scope": "api:read inventory:read"}).encode()
        changed = ".".join([header, base64.urlsafe_b64encode(wider).decode().rstrip("="), signature])
    before = await rows(app)
    params, expected = {
        "revoked-subject": ({}, "invalid_request"),
        "expired-subject": ({}, "invalid_request"),
        "other-clients-token": ({"subject_token": other}, "invalid_request"),
        "wider-scope": ({"scope": "api:read inventory:read"}, "invalid_scope"),
        "audience-outside-policy": ({"audience": "https://billing.test"}, "invalid_target"),
        "resource-outside-policy": ({"resource": "https://billing.test"}, "invalid_target"),
        "actor-does-not-verify": ({"actor_token": "x" * 43, "actor_token_type": ACCESS}, "invalid_request"),
        "actor-of-another-client": ({"actor_token": other, "actor_token_type": ACCESS}, "invalid_request"),
        "jwt-of-a-revoked-token": ({"subject_token": subject_jwt}, "invalid_request"),
        "jwt-signed-elsewhere": ({"subject_token": elsewhere}, "invalid_request"),
        "jwt-with-a-changed-claim": ({"subject_token": changed}, "invalid_request"),
        "jwt-of-an-id-token": ({"subject_token": source["id_token"]}, "invalid_request"),
        "untrusted-workload": ({"subject_token": kube.token("billing", "worker", [ISSUER]),
                                "subject_token_type": JWT}, "invalid_request"),
        "workload-wrong-audience": ({"subject_token": kube.token("billing", "api", ["https://x.test"]),
                                     "subject_token_type": JWT}, "invalid_request"),
        "unsupported-type": ({"subject_token_type": "urn:ietf:params:oauth:token-type:saml2"}, "invalid_request"),
        "no-subject-type": ({"subject_token_type": ""}, "invalid_request"),
        "other-token-type": ({"requested_token_type": "urn:ietf:params:oauth:token-type:refresh_token"},
                             "invalid_request"),
    }[case]
    data = {"subject_token": subject, "subject_token_type": ACCESS, **params}
    response = await client.post("/oauth/v2/token", data={"grant_type": GRANT, **data}, headers=orders())
    assert response.status_code == 400, response.text
    assert response.json()["error"] == expected
    assert await rows(app) == before


async def test_a_client_without_the_grant_cannot_exchange(client, alice):
    source = await user_tokens(client, alice)
    response = await exchange(client, source["access_token"], headers=basic("svc-basic"))
    assert response.status_code == 400 and response.json()["error"] == "unauthorized_client"


async def test_discovery_lists_the_grant(client):
    meta = (await client.get("/.well-known/openid-configuration")).json()
    assert GRANT in meta["grant_types_supported"]


@pytest.mark.parametrize(("client", "message"), [
    ({"grant_types": [GRANT], "client_secret": ORDERS_SECRET}, "needs token_exchange"),
    ({"grant_types": ["client_credentials"], "client_secret": ORDERS_SECRET,
      "token_exchange": {"audiences": [INVENTORY]}}, "only it uses it"),
    ({"grant_types": [GRANT], "client_secret": ORDERS_SECRET, "token_exchange": {"audiences": []}}, "at least 1"),
    ({"grant_types": [GRANT], "token_endpoint_auth_method": "none", "token_exchange": {"audiences": [INVENTORY]}},
     "confidential"),
])
def test_the_exchange_policy_is_checked_at_load(tmp_path, client, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        make_settings(tmp_path, {}, clients=[{"client_id": "c", **client}])


async def test_a_dpop_proof_binds_the_exchanged_token(client, app, alice):
    """RFC 9449 §5: every grant, token exchange too, binds its access token to the proof's key."""
    from tests.dpop import DPoPClient
    key = DPoPClient()
    subject = (await user_tokens(client, alice))["access_token"]
    response = await exchange(client, subject, headers={**orders(), "DPoP": key.proof("POST", f"{ISSUER}/oauth/v2/token")},
                              audience=INVENTORY)
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "DPoP"
    assert (await introspect(client, response.json()["access_token"]))["cnf"] == {"jkt": key.jkt}
