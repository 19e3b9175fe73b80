"""The token endpoint with the client credentials grant (RFC 6749 §4.4, §5.1, §5.2)."""

import base64
import re

import pytest
from sqlalchemy import select

from iam.token.store import access_tokens
from tests.conftest import SECRETS, basic

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


async def get_token(client, client_id="svc-basic", **form):
    response = await client.post(
        "/oauth/v2/token", data={"grant_type": "client_credentials", **form}, headers=basic(client_id)
    )
    assert response.status_code == 200, response.text
    return response.json()


async def test_client_secret_basic_gets_an_opaque_token(client):
    response = await client.post(
        "/oauth/v2/token", data={"grant_type": "client_credentials"}, headers=basic("svc-basic")
    )
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 600
    assert body["scope"] == "api:read api:write"
    # Opaque: not a JWT, 256 bits of base64url.
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", body["access_token"])
    assert len(base64.urlsafe_b64decode(body["access_token"] + "=")) == 32


async def test_client_secret_post_gets_a_token(client):
    response = await client.post(
        "/oauth/v2/token",
        data={"grant_type": "client_credentials", "client_id": "svc-post", "client_secret": SECRETS["svc-post"]},
    )
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "api:read"


async def test_argon2_hashed_secret_authenticates(client):
    for _ in range(2):  # the second call takes the remembered digest, not argon2
        body = await get_token(client, "gateway")
        assert "access_token" in body


async def test_basic_credentials_are_form_urlencoded(client):
    """RFC 6749 §2.3.1: an id or secret with reserved characters is form-urlencoded inside Basic."""
    assert "access_token" in await get_token(client, "odd:id &+")


async def test_tokens_are_unique_and_stored_only_as_digests(client, app):
    tokens = [(await get_token(client))["access_token"] for _ in range(20)]
    assert len(set(tokens)) == 20
    engine = app.state.iam.stores["token"].engine
    async with engine.connect() as conn:
        rows = (await conn.execute(select(access_tokens))).all()
    dump = repr(rows)
    assert len(rows) == 20
    for token in tokens:
        assert token not in dump
        assert token.encode() not in b"".join(row.digest for row in rows)


async def test_requested_scope_is_narrowed(client):
    assert (await get_token(client, scope="api:read"))["scope"] == "api:read"


async def test_scope_beyond_the_client_is_invalid_scope(client):
    response = await client.post(
        "/oauth/v2/token", data={"grant_type": "client_credentials", "scope": "api:read admin"}, headers=basic("svc-basic")
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_scope"
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    "headers,data,why",
    [
        ({}, {"grant_type": "client_credentials"}, "no authentication"),
        (basic("svc-basic", "wrong-secret"), {"grant_type": "client_credentials"}, "wrong secret"),
        (basic("nobody", "whatever"), {"grant_type": "client_credentials"}, "unknown client"),
        ({"Authorization": "Basic !!!"}, {"grant_type": "client_credentials"}, "malformed basic"),
        ({"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}, {"grant_type": "client_credentials"}, "no colon"),
        ({}, {"grant_type": "client_credentials", "client_id": "svc-post", "client_secret": "wrong"}, "wrong post secret"),
        (basic("svc-post"), {"grant_type": "client_credentials"}, "registered for post, used basic"),
        ({}, {"grant_type": "client_credentials", "client_id": "svc-basic", "client_secret": SECRETS["svc-basic"]}, "registered for basic, used post"),
        (basic("disabled", ""), {"grant_type": "client_credentials"}, "client with an empty secret is disabled"),
        ({}, {"grant_type": "client_credentials", "client_id": "disabled", "client_secret": ""}, "empty post secret"),
    ],
)
async def test_invalid_client_is_401_with_www_authenticate(client, headers, data, why):
    response = await client.post("/oauth/v2/token", data=data, headers=headers)
    assert response.status_code == 401, why
    assert response.json()["error"] == "invalid_client", why
    assert response.headers["www-authenticate"].startswith("Basic"), why


async def test_public_client_cannot_use_client_credentials(client):
    response = await client.post("/oauth/v2/token", data={"grant_type": "client_credentials", "client_id": "native"})
    assert response.status_code == 400
    assert response.json()["error"] == "unauthorized_client"


@pytest.mark.parametrize(
    "data,error",
    [
        ({}, "invalid_request"),
        ({"grant_type": "password", "username": "u", "password": "p"}, "unsupported_grant_type"),
        ({"grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"}, "unsupported_grant_type"),
        ({"grant_type": "client_credentials", "scope": "bad\"scope"}, "invalid_scope"),
    ],
)
async def test_bad_requests_are_400_json(client, data, error):
    response = await client.post("/oauth/v2/token", data=data, headers=basic("svc-basic"))
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"] == error


@pytest.mark.parametrize(
    "content,headers",
    [
        ('{"grant_type": "client_credentials"}', {"Content-Type": "application/json"}),
        ("grant_type=client_credentials&grant_type=client_credentials", FORM),  # RFC 6749 §3.1
        ("grant_type=client_credentials&scope=%ff", FORM),  # not UTF-8
        ("grant_type=client_credentials&" + "a=" + "x" * 5000, FORM),  # oversized value
        ("grant_type=client_credentials&" + "&".join(f"p{i}=v" for i in range(3000)), FORM),  # oversized body
        ("grant_type=client_credentials&client_secret=x", FORM),  # basic and post at once
    ],
)
async def test_malformed_input_is_a_4xx_oauth_error_and_stores_nothing(client, app, content, headers):
    response = await client.post("/oauth/v2/token", content=content, headers={**basic("svc-basic"), **headers})
    assert 400 <= response.status_code < 500
    assert response.json()["error"] == "invalid_request"
    async with app.state.iam.stores["token"].engine.connect() as conn:
        assert (await conn.execute(select(access_tokens))).all() == []


async def test_get_on_token_endpoint_is_not_allowed(client):
    response = await client.get("/oauth/v2/token")
    assert response.status_code == 405


CLIENT_AUTH_ENDPOINTS = ["/oauth/v2/token", "/oauth/v2/introspect", "/oauth/v2/revoke", "/oauth/v2/par",
                         "/oauth/v2/device_authorization"]


@pytest.mark.parametrize("path", CLIENT_AUTH_ENDPOINTS)
@pytest.mark.parametrize("credentials", [b"Basic \xc3\xa9\xff", "Basic " + base64.b64encode("é:x".encode("latin-1")).decode()])
async def test_non_ascii_basic_credentials_are_invalid_client_not_a_500(client, app, path, credentials):
    # RFC 6749 §2.3.1: whatever the header holds, a client that fails to authenticate gets invalid_client.
    response = await client.post(path, data={"grant_type": "client_credentials", "token": "x"},
                                 headers={"Authorization": credentials})
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "invalid_client"
    async with app.state.iam.stores["token"].engine.connect() as conn:
        assert (await conn.execute(select(access_tokens))).all() == []


@pytest.mark.parametrize("length", [b"\xb2", b"1\xb9", b"1e3", b"-1"])  # latin-1 superscript digits
async def test_a_content_length_that_is_not_ascii_digits_is_a_400(client, length):
    response = await client.post("/oauth/v2/token", content=b"grant_type=client_credentials",
                                 headers={**basic("svc-basic"), **FORM, "Content-Length": length})
    assert 400 <= response.status_code < 500
    assert response.json()["error"] == "invalid_request"


def _auth_failures(caplog) -> list[dict]:
    return [r.audit for r in caplog.records if getattr(r, "audit", {}).get("event") == "client.auth_failed"]


async def test_a_credential_sent_as_client_id_never_reaches_the_audit_log(client, caplog):
    caplog.set_level("INFO", logger="iam.audit")
    leaked = SECRETS["svc-basic"]
    for data in ({"client_id": leaked, "client_secret": "x"}, {"client_id": leaked}):
        response = await client.post("/oauth/v2/token", data={"grant_type": "client_credentials", **data})
        assert response.status_code == 401
    await client.post("/oauth/v2/token", data={"grant_type": "client_credentials"}, headers=basic(leaked, "x"))
    failures = _auth_failures(caplog)
    assert len(failures) == 3 and all(event["client_id"] is None for event in failures)
    assert not any(leaked in record.getMessage() or leaked in str(record.__dict__) for record in caplog.records)


@pytest.mark.parametrize("how", ["basic", "post"])
async def test_a_failed_client_authentication_names_the_registered_client(client, caplog, how):
    caplog.set_level("INFO", logger="iam.audit")
    if how == "basic":
        await client.post("/oauth/v2/token", data={"grant_type": "client_credentials"},
                          headers=basic("svc-basic", "wrong"))
    else:
        await client.post("/oauth/v2/token", data={"grant_type": "client_credentials", "client_id": "svc-post",
                                                   "client_secret": "wrong"})
    [failure] = _auth_failures(caplog)
    assert failure["client_id"] == ("svc-basic" if how == "basic" else "svc-post")
