"""An independent OpenID Connect client (Authlib) runs the code flow with PKCE against a real `iam serve`.

Everything the client knows comes from discovery (/.well-known/openid-configuration): endpoints, JWKS,
algorithms. Authlib builds the authorization request (S256 challenge, state, nonce), redeems the code,
refreshes, and its `CodeIDToken` claims validation (iss, aud, azp, nonce, at_hash, exp, iat) checks the ID
tokens after joserfc verified their signatures against the discovered JWKS. The person's part, the login
form, is played with plain httpx, reading the form as a browser would.
"""

from __future__ import annotations

import secrets
import time

import httpx
import pytest
from authlib.common.security import generate_token
from authlib.integrations.base_client import OAuthError
from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuth2Client
from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.errors import InvalidClaimError
from joserfc.jwk import KeySet

from tests.live import PASSWORD, SCOPE, WEB_SECRET, Live, form, live

__all__ = ["live"]  # the module-scoped server fixture


def discover(live: Live) -> dict:
    response = httpx.get(f"{live.issuer}/.well-known/openid-configuration", timeout=10)
    assert response.status_code == 200
    metadata = response.json()
    assert metadata["issuer"] == live.issuer  # OIDC Discovery §4.3
    assert "S256" in metadata["code_challenge_methods_supported"]
    assert "code" in metadata["response_types_supported"]
    return metadata


def id_token_claims(metadata: dict, id_token: str, client_id: str, **params) -> CodeIDToken:
    """Verify the signature against the discovered JWKS, then let Authlib validate the claims."""
    keys = KeySet.import_key_set(httpx.get(metadata["jwks_uri"], timeout=10).json())
    decoded = jwt.decode(id_token, keys, algorithms=metadata["id_token_signing_alg_values_supported"])
    options = {"iss": {"essential": True, "value": metadata["issuer"]},
               "aud": {"essential": True, "value": client_id},
               "sub": {"essential": True}, "exp": {"essential": True}, "iat": {"essential": True}}
    claims = CodeIDToken(decoded.claims, decoded.header, options, {"client_id": client_id, **params})
    claims.validate(now=int(time.time()), leeway=5)
    return claims


def browser_sign_in(authorization_url: str, redirect_prefix: str, username: str = "alice",
                    password: str = PASSWORD) -> str:
    """Play the person: follow redirects, fill in the login form if one is shown; return the callback URL."""
    with httpx.Client(timeout=10) as browser:  # its own cookie jar: a fresh browser, no SSO session
        response = browser.get(authorization_url)
        for _ in range(10):
            location = response.headers.get("location")
            if response.is_redirect and location.startswith(redirect_prefix):
                return location
            if response.is_redirect:
                response = browser.get(response.url.join(location))
            elif response.status_code == 200 and response.url.path == "/authn/login":
                action, fields = form(response.text, str(response.url))
                response = browser.post(action, data={**fields, "username": username, "password": password})
            else:
                raise AssertionError(f"unexpected {response.status_code} at {response.url}: "
                                     f"{response.text[:300]}")
    raise AssertionError("too many steps")


def test_confidential_client_code_flow_refresh_and_userinfo(live: Live):
    metadata = discover(live)
    client = OAuth2Client(client_id="web", client_secret=WEB_SECRET, scope="openid profile email groups",
                          redirect_uri=live.web_redirect, code_challenge_method="S256",
                          token_endpoint_auth_method="client_secret_basic", timeout=10)
    verifier = generate_token(64)
    nonce = generate_token(20)
    url, state = client.create_authorization_url(metadata["authorization_endpoint"], code_verifier=verifier,
                                                 nonce=nonce)
    assert "code_challenge=" in url and "code_challenge_method=S256" in url

    callback = browser_sign_in(url, live.web_redirect)
    received = httpx.URL(callback).params
    assert received["iss"] == metadata["issuer"]  # RFC 9207: the client checks where the code came from
    token = client.fetch_token(metadata["token_endpoint"], authorization_response=callback, state=state,
                               code_verifier=verifier)
    assert token["token_type"].lower() == "bearer" and token["refresh_token"]
    claims = id_token_claims(metadata, token["id_token"], "web", nonce=nonce,
                             access_token=token["access_token"])
    assert claims["sub"] == live.subjects["alice"] and claims["at_hash"]
    assert claims["preferred_username"] == "alice" and claims["groups"] == ["admins"]

    # With a nonce or an audience of someone else's, the same token fails Authlib's validation.
    with pytest.raises(InvalidClaimError):
        id_token_claims(metadata, token["id_token"], "web", nonce="another nonce")
    with pytest.raises(InvalidClaimError):
        id_token_claims(metadata, token["id_token"], "cli", nonce=nonce)

    # The library's bearer-authenticated session reads the UserInfo endpoint.
    userinfo = client.get(metadata["userinfo_endpoint"])
    assert userinfo.status_code == 200
    assert userinfo.json()["sub"] == claims["sub"] and userinfo.json()["email"] == "alice@example.com"

    time.sleep(1.05)  # so the refreshed ID token's iat is visibly later
    refreshed = client.refresh_token(metadata["token_endpoint"], refresh_token=token["refresh_token"])
    assert refreshed["refresh_token"] != token["refresh_token"]  # rotated
    again = id_token_claims(metadata, refreshed["id_token"], "web", access_token=refreshed["access_token"])
    # OIDC Core §12.2: same iss, sub, aud, azp and auth_time; a new iat.
    for name in ("iss", "sub", "aud", "azp", "auth_time", "sid"):
        assert again[name] == claims[name], name
    assert again["iat"] > claims["iat"]
    # The used refresh token is spent.
    reuse = httpx.post(metadata["token_endpoint"], auth=("web", WEB_SECRET),
                       data={"grant_type": "refresh_token", "refresh_token": token["refresh_token"]})
    assert reuse.status_code == 400 and reuse.json()["error"] == "invalid_grant"


async def test_public_native_client_with_the_async_client_on_any_loopback_port(live: Live):
    metadata = discover(live)
    # A native app listens on a port of its choice; only http://127.0.0.1/callback is registered.
    redirect_uri = f"http://127.0.0.1:{49152 + secrets.randbelow(16000)}/callback"
    async with AsyncOAuth2Client(client_id="cli", scope=SCOPE, redirect_uri=redirect_uri,
                                 code_challenge_method="S256", timeout=10) as client:
        assert client.token_endpoint_auth_method == "none"
        verifier = generate_token(48)
        nonce = generate_token(20)
        url, state = client.create_authorization_url(metadata["authorization_endpoint"],
                                                     code_verifier=verifier, nonce=nonce)
        callback = browser_sign_in(url, redirect_uri)
        assert httpx.URL(callback).params["iss"] == metadata["issuer"]
        token = await client.fetch_token(metadata["token_endpoint"], authorization_response=callback,
                                         state=state, code_verifier=verifier)
        claims = id_token_claims(metadata, token["id_token"], "cli", nonce=nonce,
                                 access_token=token["access_token"])
        assert claims["sub"] == live.subjects["alice"]

        refreshed = await client.refresh_token(metadata["token_endpoint"],
                                               refresh_token=token["refresh_token"])
        again = id_token_claims(metadata, refreshed["id_token"], "cli",
                                access_token=refreshed["access_token"])
        assert again["sub"] == claims["sub"] and again["auth_time"] == claims["auth_time"]

    # Without the verifier the code is refused (PKCE), and the library reports the server's error.
    async with AsyncOAuth2Client(client_id="cli", scope=SCOPE, redirect_uri=redirect_uri,
                                 code_challenge_method="S256", timeout=10) as client:
        url, state = client.create_authorization_url(metadata["authorization_endpoint"],
                                                     code_verifier=generate_token(48))
        callback = browser_sign_in(url, redirect_uri)
        with pytest.raises(OAuthError) as refused:
            await client.fetch_token(metadata["token_endpoint"], authorization_response=callback, state=state,
                                     code_verifier=generate_token(48))
        assert refused.value.error == "invalid_grant"
