"""Test helpers that play the browser and the client of the authorization code flow over HTTP."""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from urllib.parse import parse_qs, urljoin, urlsplit

import httpx

from tests.conftest import PASSWORD, SECRETS, WEBAPP_CALLBACK, basic


def pkce() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def query(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def hidden_fields(html: str) -> dict[str, str]:
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', html))


async def follow(http: httpx.AsyncClient, response: httpx.Response, stop_prefix: str) -> httpx.Response:
    """Follow redirects inside the server until one leaves for `stop_prefix` (the client's redirect URI)."""
    for _ in range(10):
        location = response.headers.get("location")
        if response.status_code not in (302, 303) or location is None or location.startswith(stop_prefix):
            return response
        response = await http.get(location)
    raise AssertionError("too many redirects")


async def authorize(http, client_id="webapp", redirect_uri=WEBAPP_CALLBACK, scope="openid profile email groups",
                    challenge=None, **extra) -> httpx.Response:
    params = {"client_id": client_id, "redirect_uri": redirect_uri, "response_type": "code", "scope": scope,
              "state": "st-" + secrets.token_hex(4), **extra}
    if challenge:
        params.update(code_challenge=challenge, code_challenge_method="S256")
    return await http.get("/oauth/v2/authorize", params={k: v for k, v in params.items() if v is not None})


async def sign_in(http, login_page: httpx.Response, username="alice", password=PASSWORD) -> httpx.Response:
    assert login_page.status_code == 200, login_page.text
    fields = hidden_fields(login_page.text)
    action = urljoin(str(login_page.url), "/authn/login")  # the authentication role may be another origin
    return await http.post(action, data={**fields, "username": username, "password": password})


async def code_flow(http, client_id="webapp", redirect_uri=WEBAPP_CALLBACK, scope="openid profile email groups",
                    username="alice", password=PASSWORD, **extra) -> tuple[dict, str, str]:
    """Authorize → sign in (if needed) → callback. Returns (callback params, code_verifier, state)."""
    verifier, challenge = pkce()
    first = await authorize(http, client_id, redirect_uri, scope, challenge, **extra)
    response = await follow(http, first, redirect_uri.split("?")[0])
    if response.status_code == 200 and "/authn/login" in str(response.url):
        response = await follow(http, await sign_in(http, response, username, password), redirect_uri.split("?")[0])
    assert response.status_code in (302, 303), response.text
    return query(response.headers["location"]), verifier, response.headers["location"]


async def redeem(http, code, verifier, client_id="webapp", redirect_uri=WEBAPP_CALLBACK) -> httpx.Response:
    data = {"grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri, "code_verifier": verifier}
    if client_id in SECRETS:
        return await http.post("/oauth/v2/token", data=data, headers=basic(client_id))
    return await http.post("/oauth/v2/token", data={**data, "client_id": client_id})


async def refresh(http, token, client_id="webapp", **extra) -> httpx.Response:
    data = {"grant_type": "refresh_token", "refresh_token": token, **extra}
    if client_id in SECRETS:
        return await http.post("/oauth/v2/token", data=data, headers=basic(client_id))
    return await http.post("/oauth/v2/token", data={**data, "client_id": client_id})


def advertised_paths(metadata: dict) -> list[str]:
    """The path of every endpoint a discovery document (RFC 8414 §2) points clients at, and its own."""
    issuer = metadata["issuer"].rstrip("/")
    urls = [v for k, v in metadata.items() if k.endswith(("_endpoint", "_uri")) and isinstance(v, str)]
    assert all(url.startswith(issuer + "/") for url in urls), urls
    wellknown = ["/.well-known/openid-configuration", "/.well-known/oauth-authorization-server"]
    return sorted({url[len(issuer):] for url in urls} | set(wellknown))
