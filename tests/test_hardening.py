"""HTTP hardening that every endpoint shares: response headers (ASVS 5 V3.4), error_description's character set
(RFC 6749 §5.2), 405 `Allow` (RFC 9110 §15.5.6), ID token hints (OIDC Core §3.1.2.1), client disconnects."""

from __future__ import annotations

import logging
import re
from urllib.parse import quote

import httpx

from iam.app import create_app
from iam.observability import HTTP_REQUESTS
from tests.conftest import ISSUER, WEBAPP_CALLBACK, basic, make_settings
from tests.oauth import authorize, pkce, query

HSTS = "max-age=63072000; includeSubDomains"


async def test_every_response_is_nosniff_and_hsts_on_an_https_issuer(client, alice):
    token = await client.post("/oauth/v2/token", data={"grant_type": "client_credentials"},
                              headers=basic("svc-basic"))
    responses = [
        token,
        await client.post("/oauth/v2/introspect", data={"token": "x"}, headers=basic("svc-post")),
        await client.get("/oauth/v2/phantom", headers={"Authorization": f"Bearer {token.json()['access_token']}"}),
        await client.get("/oauth/v2/phantom"),
        await client.get("/oauth/v2/jwks"),
        await client.get("/.well-known/openid-configuration"),
        await client.get("/health/live"),
        await client.get("/no/such/path"),
        await client.get("/authn/login"),
        await client.get("/assets/iam.css"),
    ]
    for response in responses:
        where = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
        assert response.headers.get_list("x-content-type-options") == ["nosniff"], where
        assert response.headers.get_list("strict-transport-security") == [HSTS], where
    page = responses[-2]
    assert page.headers["x-frame-options"] == "DENY" and "frame-ancestors 'none'" in page.headers["content-security-policy"]


async def test_no_hsts_on_an_http_issuer(tmp_path, store_urls):
    app = create_app(make_settings(tmp_path, store_urls, issuer="http://localhost:8080"))
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://localhost:8080") as http:
        response = await http.get("/oauth/v2/jwks")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "strict-transport-security" not in response.headers  # HSTS on http would mean nothing (RFC 6797 §7.2)


DESCRIPTION = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")  # RFC 6749 §5.2


async def test_error_description_never_echoes_characters_outside_rfc_6749(client):
    name = quote('é"\\\n\x7f')
    response = await client.post("/oauth/v2/token", content=f"{name}=1&{name}=2&grant_type=client_credentials",
                                 headers={**basic("svc-basic"), "Content-Type": "application/x-www-form-urlencoded"})
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "invalid_request" and "sent more than once" in body["error_description"]
    assert DESCRIPTION.fullmatch(body["error_description"]), body


async def test_405_lists_every_method_served_on_the_path(client):
    for path, methods in (("/authn/login", {"GET", "POST"}), ("/oauth/v2/userinfo", {"GET", "POST"}),
                          ("/oauth/v2/token", {"POST"}), ("/authn/password", {"GET", "POST"})):
        response = await client.put(path)
        assert response.status_code == 405, path
        allowed = {m.strip() for m in response.headers["allow"].split(",")}
        assert methods <= allowed and "PUT" not in allowed, (path, allowed)


async def test_the_hot_endpoints_answer_their_errors_as_every_other_route_does(app, client, monkeypatch, caplog):
    """The hot lane (iam.http.HotLane) skips the app's middleware: its errors still go through the app's exception
    handlers (a proper OAuth error, never a trace), and its answers carry the headers every response carries."""
    async def broken(self, token):
        raise RuntimeError("a bug")

    monkeypatch.setattr(type(app.state.iam.token.access_tokens), "live", broken)
    with caplog.at_level(logging.ERROR, logger="iam"):
        response = await client.post("/oauth/v2/introspect", data={"token": "t" * 43}, headers=basic("svc-basic"))
    assert response.status_code == 500 and response.json()["error"] == "server_error"
    assert "a bug" not in response.text and response.headers["x-content-type-options"] == "nosniff"
    assert any(record.exc_info for record in caplog.records)  # logged, with its trace, on the server side
    refused = await client.post("/oauth/v2/introspect", data={"token": "t"}, headers=basic("svc-basic", "wrong"))
    assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"
    assert refused.headers["x-content-type-options"] == "nosniff"


async def _signed_introspection_response(client) -> str:
    # RFC 9701: signed by this issuer with the ID token's key, `aud` the calling client: not an ID token.
    response = await client.post("/oauth/v2/introspect", data={"token": "x"},
                                 headers={**basic("webapp"), "Accept": "application/token-introspection+jwt"})
    assert response.status_code == 200
    return response.text


async def test_id_token_hint_must_be_an_id_token_not_anything_else_iam_signed(client):
    hint = await _signed_introspection_response(client)
    response = await authorize(client, challenge=pkce()[1], prompt="none", id_token_hint=hint)
    assert response.status_code == 302
    assert response.headers["location"].startswith(WEBAPP_CALLBACK.split("?")[0])
    params = query(response.headers["location"])
    assert params["error"] == "invalid_request" and params["iss"] == ISSUER


async def test_logout_refuses_an_id_token_hint_that_is_not_an_id_token(client):
    hint = await _signed_introspection_response(client)
    response = await client.get("/oauth/v2/end_session", params={"id_token_hint": hint})
    assert response.status_code == 400 and "location" not in response.headers
    assert "id_token_hint" in response.text


async def test_a_client_that_disconnects_mid_upload_is_neither_a_500_nor_an_error(app, caplog):
    caplog.set_level(logging.INFO)
    messages = [{"type": "http.request", "body": b"grant_type=client_", "more_body": True}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    (auth_name, auth_value), = basic("svc-basic").items()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "https",
             "path": "/oauth/v2/token", "raw_path": b"/oauth/v2/token", "root_path": "", "query_string": b"",
             "headers": [(b"host", b"iam.test"), (b"content-type", b"application/x-www-form-urlencoded"),
                         (auth_name.lower().encode(), auth_value.encode())],
             "client": ("127.0.0.1", 50000), "server": ("iam.test", 443)}
    counted = HTTP_REQUESTS.labels("/oauth/v2/token", "POST", "499")
    before = counted._value.get()
    await app(scope, receive, send)
    assert sent[0]["status"] == 499  # nginx's "client closed request": nobody reads it, and it is no 5xx
    assert counted._value.get() == before + 1
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
