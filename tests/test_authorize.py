"""The authorization endpoint: redirect URI rules, error responses, PKCE and prompt (RFC 6749 §4.1,
RFC 9700, RFC 9207, RFC 8252 §7.3, OIDC Core §3.1.2)."""

import pytest

from tests.conftest import ISSUER, WEBAPP_CALLBACK
from tests.oauth import authorize, code_flow, pkce, query


def assert_error_page(response):
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("text/html")
    assert "location" not in response.headers
    assert response.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]


@pytest.mark.parametrize(
    "redirect_uri",
    [
        "https://app.test/cb?dummy1=lorem&dummy2=ipsum&x=1",  # added query
        "https://app.test/cb?dummy1=lorem&dummy2=other",  # changed query value
        "https://app.test/cb",  # dropped query
        "https://app.test/cb/?dummy1=lorem&dummy2=ipsum",
        "https://app.test/CB?dummy1=lorem&dummy2=ipsum",
        "https://app.test/cb?dummy1=lorem&dummy2=ipsum#f",
        "https://app.test/cb/../cb?dummy1=lorem&dummy2=ipsum",
        "https://app.test%2Fcb",
        "https://app.test.evil/cb?dummy1=lorem&dummy2=ipsum",
        "https://app.test@evil.test/cb?dummy1=lorem&dummy2=ipsum",
        "http://app.test/cb?dummy1=lorem&dummy2=ipsum",
        "https://app.test:8443/cb?dummy1=lorem&dummy2=ipsum",  # ports vary only on loopback, for native clients
        None,  # OIDC: redirect_uri is required
    ],
)
async def test_unregistered_redirect_uri_shows_an_error_page_and_never_redirects(client, redirect_uri):
    verifier, challenge = pkce()
    params = {"client_id": "webapp", "response_type": "code", "scope": "openid", "state": "s",
              "code_challenge": challenge, "code_challenge_method": "S256"}
    if redirect_uri is not None:
        params["redirect_uri"] = redirect_uri
    assert_error_page(await client.get("/oauth/v2/authorize", params=params))


@pytest.mark.parametrize("client_id", ["nobody", "", "svc-basic"])  # unknown, empty, not a code-flow client
async def test_unknown_client_shows_an_error_page(client, client_id):
    response = await client.get("/oauth/v2/authorize", params={
        "client_id": client_id, "redirect_uri": WEBAPP_CALLBACK, "response_type": "code"})
    assert_error_page(response)


@pytest.mark.parametrize(
    "redirect_uri,allowed",
    [
        ("http://127.0.0.1:53917/callback", True),
        ("http://127.0.0.1/callback", True),
        ("http://localhost:18000", True),  # kubelogin's fallback port
        ("http://localhost:8000", True),
        ("http://127.0.0.1:53917/other", False),
        ("http://127.0.0.2:53917/callback", False),
        ("https://127.0.0.1:53917/callback", False),
        ("http://localhost.evil.test:8000", False),
        ("http://user@localhost:8000", False),
        # only the port may differ: scheme and host are compared exactly, never case-folded (RFC 8252 §7.3)
        ("HTTP://127.0.0.1:53917/callback", False),
        ("Http://localhost:8000", False),
        ("http://LOCALHOST:8000", False),
        ("http://127.0.0.1:99999/callback", False),
    ],
)
async def test_native_clients_may_use_any_loopback_port(client, redirect_uri, allowed):
    _, challenge = pkce()
    response = await authorize(client, "kubectl", redirect_uri, "openid", challenge)
    if allowed:
        assert response.status_code == 302
        assert response.headers["location"].startswith(f"{ISSUER}/authn/login?")
    else:
        assert_error_page(response)


async def test_web_clients_get_no_port_leeway(client):
    _, challenge = pkce()
    response = await authorize(client, "native", "http://127.0.0.1:9999/cb", "openid", challenge)
    assert_error_page(response)


@pytest.mark.parametrize(
    "extra,error",
    [
        ({"response_type": "token"}, "unsupported_response_type"),  # no implicit grant
        ({"response_type": "code id_token"}, "unsupported_response_type"),
        ({"response_type": None}, "invalid_request"),
        ({"scope": "openid admin"}, "invalid_scope"),
        ({"code_challenge_method": "plain"}, "invalid_request"),  # only S256
        ({"code_challenge": None, "code_challenge_method": None}, "invalid_request"),  # PKCE required
        ({"code_challenge": "too-short"}, "invalid_request"),
        ({"prompt": "none login"}, "invalid_request"),
        ({"max_age": "-1"}, "invalid_request"),
        ({"request": "eyJhbGciOiJub25lIn0.e30."}, "request_not_supported"),
        ({"request_uri": "https://app.test/r"}, "request_uri_not_supported"),
        ({"response_mode": "fragment"}, "invalid_request"),
        ({"id_token_hint": "not-a-jwt"}, "invalid_request"),
    ],
)
async def test_errors_after_the_redirect_uri_is_proven_go_back_with_state_and_iss(client, extra, error):
    _, challenge = pkce()
    params = {"client_id": "webapp", "redirect_uri": WEBAPP_CALLBACK, "response_type": "code", "scope": "openid",
              "state": "x" * 128, "code_challenge": challenge, "code_challenge_method": "S256", **extra}
    response = await client.get("/oauth/v2/authorize", params={k: v for k, v in params.items() if v is not None})
    assert response.status_code == 302
    location = response.headers["location"]
    assert location.startswith("https://app.test/cb?dummy1=lorem&dummy2=ipsum&")  # registered query kept
    got = query(location)
    assert got["error"] == error
    assert got["state"] == "x" * 128  # echoed exactly
    assert got["iss"] == ISSUER  # RFC 9207, on errors too
    assert "code" not in got


async def test_repeated_parameters_are_refused(client):
    response = await client.get(
        f"/oauth/v2/authorize?client_id=webapp&client_id=webapp&redirect_uri={WEBAPP_CALLBACK}&response_type=code")
    assert_error_page(response)


async def test_no_cors_at_the_authorization_endpoint(client):
    response = await authorize(client, challenge=pkce()[1], **{})
    assert "access-control-allow-origin" not in response.headers


async def test_post_authorization_request_works(client, alice):
    """OIDC Core §3.1.2.1: the request may be a POST; the answer to a POST is a 303."""
    _, challenge = pkce()
    response = await client.post("/oauth/v2/authorize", data={
        "client_id": "webapp", "redirect_uri": WEBAPP_CALLBACK, "response_type": "code", "scope": "openid",
        "code_challenge": challenge, "code_challenge_method": "S256"})
    assert response.status_code == 303
    assert "/authn/login?" in response.headers["location"]


async def test_unknown_parameters_and_reordered_scopes_are_fine(client, alice):
    params, _, _ = await code_flow(client, scope="email openid profile", extra="foobar", display="popup",
                                   ui_locales="se", claims_locales="se", acr_values="1 2")
    assert "code" in params


async def test_prompt_none_without_a_session_is_login_required(client):
    _, challenge = pkce()
    response = await authorize(client, challenge=challenge, prompt="none")
    location = response.headers["location"]
    for _ in range(3):
        if location.startswith("https://app.test/"):
            break
        response = await client.get(location)
        location = response.headers["location"]
    got = query(location)
    assert got["error"] == "login_required" and "code" not in got and got["iss"] == ISSUER
