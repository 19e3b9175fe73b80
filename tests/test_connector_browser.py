"""Sign-in through connectors in a real browser, against real `iam serve` processes and real upstreams.

Headless Chromium clicks "Sign in with ..." on iam's page and signs in at the upstream's own page:
node-oidc-provider (an OpenID provider nobody on this team wrote), a second `iam serve` acting as the upstream
OpenID provider of the first, and slapd through the LDAP form. Then kubectl's device flow through a connector.
The upstream iam runs on `localhost` and the downstream on `127.0.0.1`, so their cookies stay apart (cookies
ignore ports).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests import test_browser_flow
from tests.live import PASSWORD, Callbacks, Live, authorization_request, clients, redeem, verify_id_token
from tests.oidc_upstream import ALICE
from tests.postgres import free_port
from tests.server import iam, serve, write_config
from tests.test_browser_flow import at_callback

browser, context, page = test_browser_flow.browser, test_browser_flow.context, test_browser_flow.page  # fixtures

PEER_SECRET = "peer-secret-" + secrets.token_urlsafe(16)
UPSTREAM_SECRET = "corp-secret-" + secrets.token_urlsafe(16)


@dataclass
class Federated:
    live: Live  # the downstream iam the clients use
    upstream_iam: str  # the issuer of the second iam, the upstream of connector "peer"
    provider: str  # the issuer of node-oidc-provider, the upstream of connector "corp"


def _env(directory, issuer: str, config) -> dict[str, str]:
    return {"IAM_CONFIG": str(config), "SERVICE_ROLE": "all", "IAM_KEYS_DIR": str(directory / "keys"),
            "PEER_SECRET": PEER_SECRET, "UPSTREAM_SECRET": UPSTREAM_SECRET,
            **{f"IAM_{name.upper()}_DATABASE_URL": f"sqlite+aiosqlite:///{directory}/{name}.db"
               for name in ("authn", "token", "users")}}


@pytest.fixture(scope="module")
def federated(tmp_path_factory, oidc_upstream, ldap_server) -> Iterator[Federated]:
    down_port, up_port = free_port(), free_port()
    issuer, upstream_issuer = f"http://127.0.0.1:{down_port}", f"http://localhost:{up_port}"
    oidc_upstream.add_client("iam-browser", UPSTREAM_SECRET, [f"{issuer}/authn/connectors/corp/callback"])
    with ExitStack() as stack:
        # the upstream iam: its own user, and the downstream iam as a confidential client of its
        up_dir = tmp_path_factory.mktemp("upstream-iam")
        up_config = write_config(up_dir, issuer=upstream_issuer, purge_interval=0, clients=[{
            "client_id": "downstream-iam", "client_secret": "${PEER_SECRET}", "client_name": "Downstream iam",
            "grant_types": ["authorization_code"], "scope": "openid profile email groups",
            "redirect_uris": [f"{issuer}/authn/connectors/peer/callback"]}])
        up_env = _env(up_dir, upstream_issuer, up_config)
        added = iam("users", "add", "--username", "uma", "--email", "uma@upstream.example", "--email-verified",
                    "--group", "platform", "--group", "oncall", "--password-stdin", env=up_env, cwd=up_dir,
                    input=PASSWORD + "\n")
        assert added.returncode == 0, added.stderr
        stack.enter_context(serve(up_env, up_dir, port=up_port))

        directory = tmp_path_factory.mktemp("downstream-iam")
        callbacks = stack.enter_context(Callbacks())
        device_client = {"client_id": "kubectl", "client_name": "kubectl", "token_endpoint_auth_method": "none",
                         "grant_types": ["urn:ietf:params:oauth:grant-type:device_code"],
                         "scope": "openid profile email groups"}
        ldap = ldap_server.connector_config(id="ad").model_dump(mode="json")
        ldap["bind_password"] = ldap_server.service_password
        config = write_config(directory, issuer=issuer, purge_interval=0,
                              clients=[*clients(callbacks), device_client], connectors=[
                                  {"id": "corp", "type": "oidc", "name": "Contoso", "issuer": oidc_upstream.issuer,
                                   "client_id": "iam-browser", "client_secret": "${UPSTREAM_SECRET}",
                                   "scopes": ["openid", "email", "profile", "groups"]},
                                  {"id": "peer", "type": "oidc", "name": "Upstream iam", "issuer": upstream_issuer,
                                   "client_id": "downstream-iam", "client_secret": "${PEER_SECRET}",
                                   "scopes": ["openid", "email", "profile", "groups"]},
                                  ldap,
                              ])
        env = _env(directory, issuer, config)
        stack.enter_context(serve(env, directory, port=down_port))
        yield Federated(Live(issuer, callbacks, env, directory), upstream_issuer, oidc_upstream.issuer)


def upstream_login(page: Page, federated: Federated, username: str, password: str) -> None:
    """node-oidc-provider's own sign-in page."""
    page.wait_for_url(lambda url: url.startswith(federated.provider))
    page.get_by_label("Username").fill(username)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in", exact=True).click()


def test_sign_in_with_the_upstream_provider_in_a_browser(page: Page, federated: Federated):
    live = federated.live
    request = authorization_request(live, "web")
    page.goto(request.url)
    expect(page.get_by_role("link", name="Sign in with Contoso")).to_be_visible()
    page.get_by_role("link", name="Sign in with Contoso").click()
    upstream_login(page, federated, ALICE.username, ALICE.password)
    params = at_callback(page, request)
    assert params["state"] == request.state
    body = redeem(live, request, params["code"]).json()
    claims = verify_id_token(live, body["id_token"], "web", request.nonce)
    assert claims["groups"] == ["admins", "all-staff", "engineering"]
    assert claims["preferred_username"] == "alice" and claims["amr"] == ["pwd"]


def test_a_second_iam_is_the_upstream_of_the_first(page: Page, federated: Federated):
    live = federated.live
    request = authorization_request(live, "cli")
    page.goto(request.url)
    page.get_by_role("link", name="Sign in with Upstream iam").click()
    page.wait_for_url(lambda url: url.startswith(federated.upstream_iam + "/authn/login"))
    expect(page.get_by_text("to continue to Downstream iam")).to_be_visible()  # the upstream iam's own page
    page.get_by_label("Username").fill("uma")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in", exact=True).click()
    params = at_callback(page, request)
    body = redeem(live, request, params["code"]).json()
    claims = verify_id_token(live, body["id_token"], "cli", request.nonce)
    assert claims["groups"] == ["oncall", "platform"] and claims["email"] == "uma@upstream.example"
    assert claims["amr"] == ["pwd"]  # the upstream iam's amr, passed on


def test_ldap_sign_in_through_the_form_in_a_browser(page: Page, federated: Federated, ldap_server):
    live = federated.live
    request = authorization_request(live, "cli")
    page.goto(request.url)
    page.get_by_role("link", name="Sign in with Example Directory").click()
    expect(page.get_by_role("heading", name="Sign in with Example Directory")).to_be_visible()
    page.get_by_label("Username").fill("alice")
    page.get_by_label("Password").fill(ldap_server.password_of("alice"))
    page.get_by_role("button", name="Sign in", exact=True).click()
    params = at_callback(page, request)
    claims = verify_id_token(live, redeem(live, request, params["code"]).json()["id_token"], "cli", request.nonce)
    assert "engineering" in claims["groups"]


def test_kubectl_device_flow_through_the_connector(page: Page, federated: Federated):
    live = federated.live
    started = httpx.post(f"{live.issuer}/oauth/v2/device_authorization",
                         data={"client_id": "kubectl", "scope": "openid groups"}, timeout=10).json()
    page.goto(started["verification_uri_complete"])
    page.get_by_role("link", name="Sign in with Contoso").click()
    upstream_login(page, federated, ALICE.username, ALICE.password)
    page.wait_for_url(lambda url: url.startswith(live.issuer + "/authn/device"))
    page.get_by_role("button", name="Allow").click()
    expect(page.get_by_role("heading", name="Device connected")).to_be_visible()
    deadline = time.monotonic() + 20
    while True:
        polled = httpx.post(f"{live.issuer}/oauth/v2/token", timeout=10, data={
            "grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": started["device_code"],
            "client_id": "kubectl"})
        if polled.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(started.get("interval", 1))
    assert polled.status_code == 200, polled.text
    claims = verify_id_token(live, polled.json()["id_token"], "kubectl")
    assert claims["groups"] == ["admins", "all-staff", "engineering"]
