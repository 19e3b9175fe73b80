"""`iam kube selftest`: check a running issuer the way kube-apiserver and kubectl's plugin will use it.

One line per check, `PASS`, `FAIL` (with the precise reason) or `SKIP` (a check it depends on failed);
the command exits non-zero when anything FAILs.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TextIO

import httpx

from iam.config import ConfigError
from iam.kube import DEVICE_GRANT, discovery_url
from iam.kube.credential import PluginError, tls_context

SIGNING_ALGS = ("RS256",)  # what the printed kube-apiserver configuration allows


@dataclass(frozen=True)
class Check:
    status: str  # PASS | FAIL | SKIP
    name: str
    detail: str

    def line(self) -> str:
        return f"{self.status} {self.name}: {self.detail}"


@dataclass(frozen=True)
class Target:
    issuer: str
    client_id: str | None = None
    username_claim: str = "email"
    groups_claim: str = "groups"


class _Run:
    def __init__(self, out: TextIO | None) -> None:
        self.checks: list[Check] = []
        self.out = out

    def add(self, status: str, name: str, detail: str) -> bool:
        check = Check(status, name, detail)
        self.checks.append(check)
        if self.out is not None:
            print(check.line(), file=self.out, flush=True)
        return status == "PASS"

    def ok(self, name: str, detail: str) -> bool:
        return self.add("PASS", name, detail)

    def fail(self, name: str, detail: str) -> bool:
        return self.add("FAIL", name, detail)

    def skip(self, name: str, detail: str) -> None:
        self.add("SKIP", name, detail)


def _get_json(http: httpx.Client, url: str) -> tuple[object | None, str]:
    try:
        response = http.get(url, headers={"Accept": "application/json"})
    except httpx.TransportError as exc:
        untrusted = "CERTIFICATE_VERIFY_FAILED" in str(exc)
        hint = " (pass --certificate-authority with the issuer's CA)" if untrusted else ""
        return None, f"cannot fetch {url}: {exc}{hint}"
    if response.status_code != 200:
        return None, f"{url} answered HTTP {response.status_code}"
    try:
        return response.json(), ""
    except ValueError:
        return None, f"{url} did not answer JSON"


def run(target: Target, *, certificate_authority: str | None = None, id_token: str | None = None,
        out: TextIO | None = None, http: httpx.Client | None = None) -> list[Check]:
    checks = _Run(out)
    own = http is None
    if http is None:
        try:
            context = tls_context(certificate_authority)
        except PluginError as exc:
            raise ConfigError(str(exc)) from None
        http = httpx.Client(verify=context, timeout=10.0, follow_redirects=False)
    try:
        _run(checks, target, http, id_token)
    finally:
        if own:
            http.close()
    return checks.checks


def _run(checks: _Run, target: Target, http: httpx.Client, id_token: str | None) -> None:
    issuer = target.issuer
    if issuer.startswith("https://"):
        checks.ok("issuer https", f"{issuer} uses https")
    else:
        checks.fail("issuer https", f"{issuer} is not https: kube-apiserver accepts only an https issuer URL")

    url = discovery_url(issuer)
    metadata, problem = _get_json(http, url)
    if not isinstance(metadata, dict):
        checks.fail("discovery", problem or f"{url} is not a JSON object")
        for name in ("discovery issuer", "jwks", "signing algorithm", "device flow", "pkce", "public client"):
            checks.skip(name, "needs the discovery document")
        if id_token:
            checks.skip("id token", "needs the discovery document")
        return
    checks.ok("discovery", f"{url} answers")

    found = metadata.get("issuer")
    if found == issuer:
        checks.ok("discovery issuer", f"equals the issuer URL byte for byte ({issuer})")
    else:
        checks.fail("discovery issuer", f"discovery says issuer {found!r} but the issuer URL is {issuer!r}; "
                    "kube-apiserver requires them to match byte for byte (trailing slash included)")

    keys = _check_jwks(checks, http, metadata)

    algs = metadata.get("id_token_signing_alg_values_supported") or []
    if "RS256" in algs:
        checks.ok("signing algorithm", "id_token_signing_alg_values_supported contains RS256")
    else:
        checks.fail("signing algorithm", f"id_token_signing_alg_values_supported is {algs!r}, without RS256 "
                    "(kube-apiserver's default; HS256 is never accepted)")

    device = metadata.get("device_authorization_endpoint")
    grants = metadata.get("grant_types_supported") or []
    if isinstance(device, str) and device.startswith("https://") and DEVICE_GRANT in grants:
        checks.ok("device flow", f"device_authorization_endpoint {device}")
    elif not isinstance(device, str):
        checks.fail("device flow", "no device_authorization_endpoint in discovery (the plugin's default)")
    elif not device.startswith("https://"):
        checks.fail("device flow", f"device_authorization_endpoint {device} is not https")
    else:
        checks.fail("device flow", f"grant_types_supported lacks {DEVICE_GRANT}")

    methods = metadata.get("code_challenge_methods_supported") or []
    if "S256" in methods:
        checks.ok("pkce", "code_challenge_methods_supported contains S256")
    else:
        checks.fail("pkce", f"code_challenge_methods_supported is {methods!r}, without S256")

    auth_methods = metadata.get("token_endpoint_auth_methods_supported") or ["client_secret_basic"]
    if "none" in auth_methods:
        checks.ok("public client", "token_endpoint_auth_methods_supported contains none")
    else:
        checks.fail("public client", "token_endpoint_auth_methods_supported lacks none (kubectl has no secret)"
                    if auth_methods else "no token_endpoint_auth_methods_supported")

    if id_token:
        _check_id_token(checks, target, id_token, keys)


def _check_jwks(checks: _Run, http: httpx.Client, metadata: dict):
    from joserfc.errors import JoseError
    from joserfc.jwk import KeySet

    jwks_uri = metadata.get("jwks_uri")
    if not isinstance(jwks_uri, str):
        checks.fail("jwks", "no jwks_uri in discovery")
        return None
    document, problem = _get_json(http, jwks_uri)
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        checks.fail("jwks", problem or f"{jwks_uri} is not a JWK set")
        return None
    rs256 = [key for key in document["keys"] if isinstance(key, dict) and key.get("kty") == "RSA"
             and key.get("alg", "RS256") == "RS256" and key.get("use", "sig") == "sig"]
    with_kid = [key for key in rs256 if key.get("kid")]
    if not rs256:
        checks.fail("jwks", f"{jwks_uri} has no RSA key for RS256 (found {len(document['keys'])} keys)")
        return None
    if not with_kid:
        checks.fail("jwks", f"{jwks_uri} has RS256 keys without kid")
        return None
    try:
        keys = KeySet.import_key_set({"keys": document["keys"]})
    except (JoseError, ValueError, TypeError) as exc:
        checks.fail("jwks", f"{jwks_uri} cannot be read as a JWK set: {exc}")
        return None
    checks.ok("jwks", f"{jwks_uri} has {len(with_kid)} RS256 key(s) with kid")
    return keys


def _check_id_token(checks: _Run, target: Target, id_token: str, keys) -> None:
    from joserfc import jwt
    from joserfc.errors import JoseError
    from joserfc.jws import extract_compact

    try:
        compact = extract_compact(id_token.strip().encode())
        header = compact.headers()
        claims = json.loads(compact.payload)
        if not isinstance(claims, dict):
            raise ValueError("the payload is not a JSON object")
    except (JoseError, ValueError, TypeError) as exc:
        checks.fail("id token", f"not a JWT: {exc}")
        return
    alg = header.get("alg")
    if alg not in SIGNING_ALGS:
        allowed = ", ".join(SIGNING_ALGS)
        checks.fail("id token signature", f"alg {alg!r} is not allowed (kube-apiserver: {allowed})")
    elif keys is None:
        checks.skip("id token signature", "needs the JWKS")
    else:
        try:
            jwt.decode(id_token.strip(), keys, algorithms=list(SIGNING_ALGS))
            checks.ok("id token signature", f"{alg} signature verifies with kid {header.get('kid')!r}")
        except (JoseError, ValueError, TypeError) as exc:
            checks.fail("id token signature",
                        f"does not verify against the JWKS (kid {header.get('kid')!r}): {exc}")

    if claims.get("iss") == target.issuer:
        checks.ok("id token iss", "equals the issuer URL")
    else:
        checks.fail("id token iss", f"iss {claims.get('iss')!r} is not the issuer URL {target.issuer!r}")

    audience = claims.get("aud")
    audiences = [audience] if isinstance(audience, str) else audience if isinstance(audience, list) else []
    if target.client_id is None:
        checks.skip("id token aud", "no client id (give --cluster or --client-id)")
    elif target.client_id in audiences:
        checks.ok("id token aud", f"contains {target.client_id!r}")
    else:
        checks.fail("id token aud", f"aud {audience!r} does not contain the client id {target.client_id!r}")

    exp = claims.get("exp")
    now = int(time.time())
    if not isinstance(exp, int):
        checks.fail("id token exp", "no numeric exp claim")
    elif exp <= now:
        checks.fail("id token exp", f"expired {now - exp} s ago")
    else:
        checks.ok("id token exp", f"valid for {exp - now} more s")

    username = claims.get(target.username_claim)
    if isinstance(username, str) and username:
        checks.ok("id token username", f"{target.username_claim} = {username!r}")
    else:
        checks.fail("id token username", f"the username claim {target.username_claim!r} is "
                    + ("absent" if username is None else f"not a non-empty string: {username!r}"))
    if target.username_claim == "email":
        verified = claims.get("email_verified")
        if verified is True:
            checks.ok("id token email_verified", "true")
        else:
            checks.fail("id token email_verified",
                        f"is {verified!r}: kube-apiserver rejects a username from an unverified email "
                        "(the printed configuration requires email_verified: true)")

    groups = claims.get(target.groups_claim)
    if isinstance(groups, list) and all(isinstance(group, str) for group in groups):
        checks.ok("id token groups", f"{target.groups_claim} = {groups!r}")
    elif groups is None:
        checks.fail("id token groups",
                    f"the groups claim {target.groups_claim!r} is absent from the ID token "
                    "(request the groups scope; kube-apiserver does not call userinfo)")
    else:
        checks.fail("id token groups",
                    f"the groups claim {target.groups_claim!r} is not an array of strings: {groups!r}")
