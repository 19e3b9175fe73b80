"""A real upstream OpenID Connect provider for the tests: node-oidc-provider (tests/fixtures/oidc-provider).

The session fixture `oidc_upstream` (tests/conftest.py) starts one for the whole run on a free 127.0.0.1
port; every test registers its own client, so tests do not see each other's changes:

    upstream.issuer                                   # "http://127.0.0.1:PORT", discovery and JWKS under it
    entry = upstream.register_iam(iam_issuer, "corp")  # a client for {iam_issuer}/authn/connectors/corp/callback;
                                                      # entry: the `connectors:` item (id, type, name, issuer,
                                                      # client_id, client_secret) for iam's configuration
    upstream.add_client(client_id, client_secret, [redirect_uri], **metadata)  # RFC 7591 client metadata
    upstream.add_account(Account(username, password, sub, claims={...}))       # ALICE and BOB are there
    upstream.configure(claims_in_id_token=True)       # claims in the ID token too, not only at userinfo
    with upstream.configured(client_auth_methods=["client_secret_post"]): ...   # provider-wide, then undone
    upstream.rotate_keys(keep_old=True) -> new kid    # the provider signs with a new key from now on
    params = await upstream.sign_in(http, authorization_url, "alice", ALICE.password, redirect_uri=...)
    params = await upstream.decline(http, authorization_url, redirect_uri=...)   # error=access_denied

`sign_in`/`decline` drive the upstream's sign-in page with form posts, as a browser without JavaScript would,
until the upstream redirects to `redirect_uri`; they return that redirect's query parameters (code, state,
iss, or error). `http` is one browser: an httpx.AsyncClient (it keeps the upstream's session cookie, so a
second sign-in in the same client gets its code without the form, as single sign-on does).
A browser sees the same page: a form with `username`, `password`, a "Sign in" button and a "Cancel" button
(playwright: `page.fill("input[name=username]", ...)`, `page.click("text=Sign in")`); a wrong password shows
the form again with status 401 and `[role=alert]` "Invalid username or password.".

Claims per scope: openid (sub, acr, amr, auth_time), email (email, email_verified), profile (name,
preferred_username, given_name, family_name, groups), groups (groups). By default the ID token carries only
sub/acr/amr/auth_time and the rest comes from userinfo (the provider's default, OIDC Core §5.4).

Every change is written to the provider's JSON configuration and reloaded at once (POST /__fixture/reload);
codes and sessions issued before a change stay valid. `configure` lasts for the rest of the run: prefer
`configured`. Another, separate provider: `with running_upstream(directory) as upstream: ...`. The provider's
own log is `upstream.log` in its directory.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urljoin, urlsplit

import httpx
from joserfc.jwk import RSAKey

from tests.server import terminate

FIXTURE_DIR = Path(__file__).parent / "fixtures" / "oidc-provider"


@dataclass(frozen=True)
class Account:
    username: str
    password: str
    sub: str
    claims: dict[str, Any] = field(default_factory=dict)  # released per scope (openid, email, profile, groups)
    amr: list[str] = field(default_factory=lambda: ["pwd"])
    acr: str | None = None


ALICE = Account("alice", "alice-upstream-password-7f3a", "0b6f1c7e-alice", {
    "preferred_username": "alice", "email": "alice@contoso.example", "email_verified": True,
    "name": "Alice Liddell", "groups": ["engineering", "admins", "all-staff"],
})
BOB = Account("bob", "bob-upstream-password-93c1", "5d2e8a90-bob", {
    "preferred_username": "bob", "email": "bob@contoso.example", "email_verified": False, "name": "Bob",
    "groups": ["all-staff"],
})


def new_signing_key() -> dict:
    kid = "k-" + secrets.token_hex(6)
    return RSAKey.generate_key(2048, parameters={"kid": kid, "alg": "RS256", "use": "sig"}, private=True).as_dict(
        private=True)


class OidcUpstream:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.config_path = directory / "provider.json"
        self._token = secrets.token_urlsafe(16)
        self._config: dict[str, Any] = {
            "clients": [],
            "accounts": [asdict(ALICE), asdict(BOB)],
            "jwks": {"keys": [new_signing_key()]},
        }
        self._write()
        self._log = (directory / "upstream.log").open("ab")
        self._process = subprocess.Popen(
            ["node", str(FIXTURE_DIR / "provider.mjs"), str(self.config_path)],
            cwd=FIXTURE_DIR, env={**os.environ, "FIXTURE_TOKEN": self._token, "NODE_ENV": "test"},
            stdout=subprocess.PIPE, stderr=self._log,
        )
        line = self._process.stdout.readline()  # the provider prints its issuer once it listens
        if not line:
            self.stop()
            raise RuntimeError(f"the upstream provider did not start; see {directory / 'upstream.log'}")
        self.issuer: str = json.loads(line)["issuer"]

    # -- configuration -------------------------------------------------------------------------------------
    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def signing_kid(self) -> str:
        return self._config["jwks"]["keys"][0]["kid"]

    def add_client(self, client_id: str, client_secret: str | None, redirect_uris: list[str], **metadata) -> None:
        client = {"client_id": client_id, "redirect_uris": redirect_uris, "grant_types": ["authorization_code"],
                  "response_types": ["code"], **metadata}
        if client_secret is None:
            client.setdefault("token_endpoint_auth_method", "none")
        else:
            client["client_secret"] = client_secret
        self._config["clients"] = [c for c in self._config["clients"] if c["client_id"] != client_id] + [client]
        self._reload()

    def register_iam(self, iam_issuer: str, connector_id: str = "corp", name: str = "Contoso",
                     **settings) -> dict[str, Any]:
        """Register an iam at this provider (a new client for its callback URL); return the `connectors:` entry
        for that iam's configuration, with `settings` (scopes, claims, groups, ...) merged in."""
        client_id, secret = f"iam-{connector_id}-{secrets.token_hex(4)}", secrets.token_urlsafe(24)
        self.add_client(client_id, secret, [f"{iam_issuer.rstrip('/')}/authn/connectors/{connector_id}/callback"])
        return {"id": connector_id, "type": "oidc", "name": name, "issuer": self.issuer, "client_id": client_id,
                "client_secret": secret, **settings}

    def add_account(self, account: Account) -> None:
        accounts = [a for a in self._config["accounts"] if a["username"] != account.username]
        self._config["accounts"] = [*accounts, asdict(account)]
        self._reload()

    def configure(self, **settings) -> None:
        """Provider-wide settings: claims_in_id_token, client_auth_methods, scope_claims (see provider.mjs)."""
        self._config.update(settings)
        self._reload()

    @contextmanager
    def configured(self, **settings):
        """Provider-wide settings for the duration of a `with` block only."""
        before = {name: self._config[name] for name in settings if name in self._config}
        self.configure(**settings)
        try:
            yield self
        finally:
            for name in settings:
                self._config.pop(name, None)
            self.configure(**before)

    def rotate_keys(self, keep_old: bool = True) -> str:
        """Sign with a new key from now on (published first in the JWKS); return its kid."""
        key = new_signing_key()
        self._config["jwks"]["keys"] = [key, *(self._config["jwks"]["keys"] if keep_old else [])]
        self._reload()
        return key["kid"]

    def _write(self) -> None:
        self.config_path.write_text(json.dumps(self._config))

    def _reload(self) -> None:
        self._write()
        response = httpx.post(self.issuer + "/__fixture/reload", headers={"x-fixture-token": self._token})
        response.raise_for_status()

    # -- a person at the upstream's sign-in page -------------------------------------------------------------
    async def sign_in(self, http: httpx.AsyncClient, authorization_url: str, username: str, password: str, *,
                      redirect_uri: str) -> dict[str, str]:
        return await self._drive(http, authorization_url, redirect_uri, {"username": username, "password": password})

    async def decline(self, http: httpx.AsyncClient, authorization_url: str, *, redirect_uri: str) -> dict[str, str]:
        return await self._drive(http, authorization_url, redirect_uri, None)

    async def _drive(self, http: httpx.AsyncClient, url: str, redirect_uri: str,
                     form: dict[str, str] | None) -> dict[str, str]:
        submitted = False
        response = await http.get(url)
        for _ in range(10):
            if response.is_redirect:
                location = urljoin(str(response.url), response.headers["location"])
                if location.startswith(redirect_uri):
                    return dict(parse_qsl(urlsplit(location).query))
                response = await http.get(location)
                continue
            if response.status_code not in (200, 401) or submitted and response.status_code == 401:
                raise AssertionError(f"upstream answered {response.status_code}: {response.text[:300]}")
            forms = re.findall(r'<form method="post" action="([^"]+)">', response.text)
            action = next(a for a in forms if a.endswith("/login" if form is not None else "/abort"))
            response = await http.post(urljoin(str(response.url), action), data=form or {})
            submitted = True
        raise AssertionError("the upstream never redirected back")

    def stop(self) -> None:
        if self._process.poll() is None:
            terminate(self._process, 5)
        self._process.stdout.close()
        self._log.close()


@contextmanager
def running_upstream(directory: Path):
    """A running upstream provider, stopped on exit."""
    if not (FIXTURE_DIR / "node_modules" / "oidc-provider").is_dir():
        raise RuntimeError(f"run `npm ci` in {FIXTURE_DIR} first (.ci/run does)")
    upstream = OidcUpstream(directory)
    try:
        yield upstream
    finally:
        upstream.stop()
