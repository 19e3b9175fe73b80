"""`iam kubectl-credential`: a kubectl exec credential plugin (client.authentication.k8s.io/v1).

kubectl runs it before talking to the API server and reads one ExecCredential from its stdout: the user's
ID token and when it expires. The plugin:

1. prints the cached ID token while it is fresh;
2. otherwise refreshes it with the cached refresh token (iam re-issues an ID token on refresh);
3. otherwise, or when the refresh token was revoked or has expired, logs in: the device flow (RFC 8628,
   the default: a URL and a code on stderr) or a loopback redirect (RFC 8252, PKCE S256, `state` and
   `iss` checked).

With `--logout` it revokes the cached refresh token at the issuer and deletes the cache instead.

Stdout carries only the ExecCredential: everything for the person goes to stderr, which kubectl passes
through. The token cache is one file per issuer, client and scope, 0600 in a 0700 directory, replaced
atomically. Parallel kubectl calls may refresh with the same refresh token at once; iam's per-client
`refresh_reuse_window` gives each the same successor.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import html
import http.server
import json
import os
import secrets
import ssl
import sys
import tempfile
import threading
import time
import webbrowser
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx

from iam.kube import DEFAULT_SCOPE, DEVICE_GRANT, EXEC_API_VERSION, discovery_url

EXEC_API_VERSIONS = (EXEC_API_VERSION, "client.authentication.k8s.io/v1beta1")
# As kubelogin: register http://localhost:8000 and http://localhost:18000 (a native client: any port).
LOOPBACK_PORTS = (8000, 18000, 0)
MAX_MARGIN = 30  # refresh this long before the ID token expires (at most half its lifetime)
SESSION_ENDED = "your iam session has ended (the refresh token was revoked or expired); log in again"


class PluginError(Exception):
    """The plugin cannot produce a credential; the message is for the person at the terminal."""


class SessionEnded(Exception):
    """The refresh token was refused (invalid_grant): only a new login helps."""


@dataclass(frozen=True)
class Options:
    issuer: str
    client_id: str
    scope: str = DEFAULT_SCOPE
    grant: str = "device"  # device | loopback
    certificate_authority: str | None = None
    cache_dir: Path | None = None
    login_timeout: float = 600  # seconds to wait for the person to finish logging in


def default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg) / "iam" if xdg else Path.home() / ".kube" / "cache" / "iam"


# -- token cache ----------------------------------------------------------------------------------------
class TokenCache:
    """One JSON file per (issuer, client_id, scope): the ID token and the refresh token."""

    def __init__(self, directory: Path, issuer: str, client_id: str, scope: str) -> None:
        self.directory = directory
        self.key = {"issuer": issuer, "client_id": client_id, "scope": scope}
        name = hashlib.sha256(json.dumps([issuer, client_id, scope]).encode()).hexdigest()[:40]
        self.path = directory / f"{name}.json"

    def load(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or any(data.get(k) != v for k, v in self.key.items()):
            return None
        return data

    def save(self, id_token: str, refresh_token: str | None) -> None:
        if not self.directory.is_dir():
            self.directory.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                self.directory.mkdir(mode=0o700)
                os.chmod(self.directory, 0o700)  # whatever the umask
        data = {**self.key, "id_token": id_token, "refresh_token": refresh_token}
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".json")  # 0600
        try:
            with os.fdopen(fd, "w") as file:
                json.dump(data, file)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o600)
            os.replace(temporary, self.path)  # atomic: parallel readers see the old file or the new one
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def delete(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


# -- ID tokens ------------------------------------------------------------------------------------------
def read_claims(id_token: str) -> dict:
    """The ID token's claims, unverified: kube-apiserver verifies the signature; we only need `exp`."""
    from joserfc.errors import JoseError
    from joserfc.jws import extract_compact

    try:
        claims = json.loads(extract_compact(id_token.encode()).payload)
    except (JoseError, ValueError, TypeError) as exc:
        raise PluginError(f"the ID token is not a JWT ({exc})") from None
    if not isinstance(claims, dict) or not isinstance(claims.get("exp"), int):
        raise PluginError("the ID token has no numeric exp claim")
    return claims


def check_claims(claims: dict, options: Options, nonce: str | None = None) -> None:
    if claims.get("iss") != options.issuer:
        raise PluginError(f"the ID token's iss {claims.get('iss')!r} is not the issuer {options.issuer!r}")
    audience = claims.get("aud")
    audiences = [audience] if isinstance(audience, str) else audience if isinstance(audience, list) else []
    if options.client_id not in audiences:
        raise PluginError(f"the ID token's aud {audience!r} does not contain the client id "
                          f"{options.client_id!r}")
    if nonce is not None and claims.get("nonce") != nonce:
        raise PluginError("the ID token's nonce does not match the login request")


def fresh(claims: dict, now: float) -> bool:
    lifetime = claims["exp"] - claims["iat"] if isinstance(claims.get("iat"), int) else 2 * MAX_MARGIN
    margin = min(MAX_MARGIN, max(lifetime, 0) // 2)
    return now < claims["exp"] - margin


# -- HTTP -----------------------------------------------------------------------------------------------
def tls_context(certificate_authority: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    if certificate_authority:
        try:
            context.load_verify_locations(cafile=certificate_authority)
        except (OSError, ssl.SSLError) as exc:
            raise PluginError(f"cannot load the CA bundle {certificate_authority}: {exc}") from None
    return context


class Issuer:
    """The issuer's endpoints, from its discovery document, and the token requests the plugin makes."""

    def __init__(self, options: Options, http: httpx.Client) -> None:
        self.options = options
        self.http = http
        self.metadata: dict = {}

    def _request(self, method: str, url: str, **kwargs) -> httpx.Response:
        try:
            return self.http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            hint = ""
            if "CERTIFICATE_VERIFY_FAILED" in str(exc):
                hint = " (is the issuer's CA trusted? pass --certificate-authority)"
            raise PluginError(f"cannot reach {url}: {exc}{hint}") from None

    def discover(self) -> dict:
        url = discovery_url(self.options.issuer)
        response = self._request("GET", url)
        try:
            metadata = response.json() if response.status_code == 200 else None
        except ValueError:
            metadata = None
        if not isinstance(metadata, dict):
            raise PluginError(f"no discovery document at {url} (HTTP {response.status_code})")
        if metadata.get("issuer") != self.options.issuer:
            raise PluginError(f"the discovery document's issuer {metadata.get('issuer')!r} is not "
                              f"{self.options.issuer!r}; they must match exactly")
        if not isinstance(metadata.get("token_endpoint"), str):
            raise PluginError(f"the discovery document at {url} has no token_endpoint")
        self.metadata = metadata
        return metadata

    def endpoint(self, name: str) -> str:
        value = self.metadata.get(name)
        if not isinstance(value, str):
            raise PluginError(f"the issuer does not advertise {name}")
        return value

    def token_request(self, form: dict[str, str]) -> tuple[int, dict]:
        response = self._request("POST", self.endpoint("token_endpoint"),
                                 data={**form, "client_id": self.options.client_id},
                                 headers={"Accept": "application/json"})
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise PluginError(f"the token endpoint answered HTTP {response.status_code} without JSON")
        return response.status_code, body

    def tokens(self, form: dict[str, str]) -> dict:
        status, body = self.token_request(form)
        if status != 200:
            raise PluginError(describe_error(body, status))
        if not isinstance(body.get("id_token"), str):
            raise PluginError("the token response has no id_token (is `openid` in the client's scope?)")
        return body

    def revoke(self, refresh_token: str) -> None:
        """RFC 7009: the answer is 200 even for a token already invalid, so anything else is a failure."""
        response = self._request("POST", self.endpoint("revocation_endpoint"), data={
            "token": refresh_token, "token_type_hint": "refresh_token", "client_id": self.options.client_id})
        if response.status_code != 200:
            raise PluginError(f"the revocation endpoint answered HTTP {response.status_code}")

    def refresh(self, refresh_token: str) -> dict:
        status, body = self.token_request({"grant_type": "refresh_token", "refresh_token": refresh_token})
        if status in (400, 401) and body.get("error") == "invalid_grant":
            raise SessionEnded(body.get("error_description") or "invalid_grant")
        if status != 200:
            raise PluginError("cannot refresh the ID token: " + describe_error(body, status))
        if not isinstance(body.get("id_token"), str):
            raise PluginError("id_token is missing in the token response to the refresh")
        return body


def describe_error(body: dict, status: int) -> str:
    error = body.get("error") or f"HTTP {status}"
    description = body.get("error_description")
    return f"{error}: {description}" if description else str(error)


# -- device flow (RFC 8628) -----------------------------------------------------------------------------
def device_login(issuer: Issuer, options: Options, err: TextIO, sleep=time.sleep) -> dict:
    endpoint = issuer.endpoint("device_authorization_endpoint")
    response = issuer._request("POST", endpoint, headers={"Accept": "application/json"},
                               data={"client_id": options.client_id, "scope": options.scope})
    try:
        started = response.json()
    except ValueError:
        started = {}
    if response.status_code != 200 or not isinstance(started, dict) or "device_code" not in started:
        raise PluginError("cannot start the device login: " + describe_error(
            started if isinstance(started, dict) else {}, response.status_code))
    uri, code = started.get("verification_uri"), started.get("user_code")
    complete = started.get("verification_uri_complete")
    print(f"iam: to log in to {options.issuer}, open this address in a browser:\n\n    {complete or uri}\n",
          file=err, flush=True)
    if complete:
        print(f"iam: or go to {uri} and enter the code {code}", file=err, flush=True)
    else:
        print(f"iam: and enter the code {code}", file=err, flush=True)
    interval = max(int(started.get("interval") or 5), 1)
    deadline = time.monotonic() + min(float(started.get("expires_in") or 600), options.login_timeout)
    print("iam: waiting for the login to complete...", file=err, flush=True)
    while True:
        sleep(interval + 0.25)  # a little over the interval: never early by the server's clock
        if time.monotonic() > deadline:
            raise PluginError("the login code expired before the login was completed; run the command again")
        status, body = issuer.token_request({"grant_type": DEVICE_GRANT,
                                             "device_code": started["device_code"]})
        if status == 200:
            if not isinstance(body.get("id_token"), str):
                raise PluginError("the token response has no id_token (is `openid` in the client's scope?)")
            return body
        error = body.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += 5  # RFC 8628 §3.5
            continue
        if error == "expired_token":
            raise PluginError("the login code expired before the login was completed; run the command again")
        if error == "access_denied":
            raise PluginError("the login was denied in the browser")
        raise PluginError("the device login failed: " + describe_error(body, status))


# -- loopback redirect (RFC 8252 §7.3, PKCE RFC 7636) -------------------------------------------------
class _Callback(http.server.BaseHTTPRequestHandler):
    server: _CallbackServer

    def do_GET(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        params = {key: values[0] for key, values in parse_qs(parts.query).items()}
        if parts.path not in ("", "/") or not ({"code", "error"} & set(params)):
            self._answer(404, "Not found", "This is the iam kubectl login callback.")
            return
        if self.server.result is None:
            self.server.result = params
            ok = "code" in params
            self._answer(200 if ok else 400, "Logged in" if ok else "Login failed",
                         "You can close this window and return to the terminal." if ok else
                         f"{params.get('error')}: {params.get('error_description', '')}")
            self.server.done.set()
        else:
            self._answer(409, "Already done", "This login has already completed.")

    def _answer(self, status: int, title: str, message: str) -> None:
        body = (f"<!doctype html><meta charset=utf-8><title>{html.escape(title)}</title>"
                f"<h1>{html.escape(title)}</h1><p>{html.escape(message)}</p>").encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Referrer-Policy", "no-referrer")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdout and stderr stay clean
        pass


class _CallbackServer(http.server.HTTPServer):
    def __init__(self, port: int) -> None:
        super().__init__(("127.0.0.1", port), _Callback)
        self.result: dict | None = None
        self.done = threading.Event()


def _bind_loopback() -> _CallbackServer:
    for port in LOOPBACK_PORTS:
        try:
            return _CallbackServer(port)
        except OSError:
            continue
    raise PluginError("cannot listen on 127.0.0.1 for the login redirect")


def pkce_pair() -> tuple[str, str]:
    verifier = secrets.token_urlsafe(48)
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    return verifier, challenge


def loopback_login(issuer: Issuer, options: Options, err: TextIO) -> dict:
    authorize = issuer.endpoint("authorization_endpoint")
    if "S256" not in (issuer.metadata.get("code_challenge_methods_supported") or []):
        raise PluginError("the issuer does not advertise PKCE S256 (code_challenge_methods_supported)")
    server = _bind_loopback()
    redirect_uri = f"http://localhost:{server.server_address[1]}"
    verifier, challenge = pkce_pair()
    state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    params = {"client_id": options.client_id, "response_type": "code", "redirect_uri": redirect_uri,
              "scope": options.scope, "state": state, "nonce": nonce, "code_challenge": challenge,
              "code_challenge_method": "S256"}
    url = f"{authorize}{'&' if '?' in authorize else '?'}{urlencode(params)}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    try:
        print(f"iam: to log in to {options.issuer}, open this address in a browser:\n\n    {url}\n",
              file=err, flush=True)
        with contextlib.suppress(Exception):
            webbrowser.open(url)
        if not server.done.wait(options.login_timeout):
            raise PluginError("the login was not completed in time; run the command again")
    finally:
        server.shutdown()
        server.server_close()
    result = server.result or {}
    if result.get("state") != state:
        raise PluginError("the login redirect carried the wrong state; start again")
    if "iss" in result or issuer.metadata.get("authorization_response_iss_parameter_supported"):
        if result.get("iss") != options.issuer:  # RFC 9207 §2.4: mix-up defence
            raise PluginError(f"the login redirect's iss {result.get('iss')!r} is not the issuer "
                              f"{options.issuer!r}")
    if "error" in result:
        raise PluginError("the login failed: " + describe_error(result, 400))
    tokens = issuer.tokens({"grant_type": "authorization_code", "code": result.get("code", ""),
                            "redirect_uri": redirect_uri, "code_verifier": verifier})
    check_claims(read_claims(tokens["id_token"]), options, nonce=nonce)
    return tokens


# -- the plugin -----------------------------------------------------------------------------------------
def exec_api_version(err: TextIO) -> str:
    """kubectl describes the call in KUBERNETES_EXEC_INFO; answer in the apiVersion it used."""
    raw = os.environ.get("KUBERNETES_EXEC_INFO")
    if not raw:
        return EXEC_API_VERSION
    try:
        info = json.loads(raw)
        version = info.get("apiVersion")
    except (ValueError, AttributeError):
        print("iam: warning: KUBERNETES_EXEC_INFO is not valid JSON; answering in "
              f"{EXEC_API_VERSION}", file=err)
        return EXEC_API_VERSION
    if version not in EXEC_API_VERSIONS:
        raise PluginError(f"unsupported exec credential apiVersion {version!r} (supported: "
                          + ", ".join(EXEC_API_VERSIONS) + ")")
    return version


def exec_credential(api_version: str, id_token: str, exp: int) -> dict:
    expires = datetime.fromtimestamp(exp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"apiVersion": api_version, "kind": "ExecCredential",
            "status": {"token": id_token, "expirationTimestamp": expires}}


def get_token(options: Options, err: TextIO, http: httpx.Client | None = None) -> tuple[str, dict]:
    """A fresh ID token and its claims: from the cache, by refresh, or by a new login."""
    directory = options.cache_dir or default_cache_dir()
    cache = TokenCache(directory, options.issuer, options.client_id, options.scope)
    cached = cache.load()
    if cached and isinstance(cached.get("id_token"), str):
        try:
            claims = read_claims(cached["id_token"])
        except PluginError:
            claims = None
        if claims is not None and fresh(claims, time.time()):
            return cached["id_token"], claims

    own_http = http is None
    if http is None:
        http = httpx.Client(verify=tls_context(options.certificate_authority), timeout=15.0,
                            headers={"User-Agent": "iam-kubectl-credential"})
    try:
        issuer = Issuer(options, http)
        issuer.discover()
        tokens = None
        refresh_token = cached.get("refresh_token") if cached else None
        if isinstance(refresh_token, str) and refresh_token:
            try:
                tokens = issuer.refresh(refresh_token)
            except SessionEnded as exc:
                cache.delete()
                refresh_token = None
                print(f"iam: {SESSION_ENDED}", file=err, flush=True)
                print(f"iam: (the issuer said: {exc})", file=err, flush=True)
        if tokens is None:
            tokens = loopback_login(issuer, options, err) if options.grant == "loopback" else \
                device_login(issuer, options, err)
    finally:
        if own_http:
            http.close()
    claims = read_claims(tokens["id_token"])
    check_claims(claims, options)
    cache.save(tokens["id_token"], tokens.get("refresh_token") or refresh_token)
    return tokens["id_token"], claims


def logout(options: Options, err: TextIO, http: httpx.Client | None = None) -> int:
    """Revoke the cached refresh token at the issuer (RFC 7009) and forget the cached tokens.

    The cache is kept if the issuer could not be told, so the person can try again rather than leave a live
    refresh token behind.
    """
    cache = TokenCache(options.cache_dir or default_cache_dir(), options.issuer, options.client_id, options.scope)
    cached = cache.load() or {}
    refresh_token = cached.get("refresh_token")
    if isinstance(refresh_token, str) and refresh_token:
        own_http = http is None
        if http is None:
            http = httpx.Client(verify=tls_context(options.certificate_authority), timeout=15.0,
                                headers={"User-Agent": "iam-kubectl-credential"})
        try:
            issuer = Issuer(options, http)
            issuer.discover()
            issuer.revoke(refresh_token)
        except PluginError as exc:
            print(f"iam: cannot log out: {exc}", file=err, flush=True)
            return 1
        finally:
            if own_http:
                http.close()
    cache.delete()
    print(f"iam: logged out of {options.issuer}" if cached else "iam: no cached login to end", file=err, flush=True)
    return 0


def main(options: Options) -> int:
    """Run the plugin: the ExecCredential on stdout, everything else on stderr. Returns the exit status."""
    # Anything a library or a browser launcher might print goes to stderr: stdout belongs to kubectl.
    sys.stdout.flush()
    stdout_fd = os.dup(1)
    os.dup2(2, 1)
    err = sys.stderr
    try:
        api_version = exec_api_version(err)
        id_token, claims = get_token(options, err)
        data = (json.dumps(exec_credential(api_version, id_token, claims["exp"])) + "\n").encode()
        while data:
            data = data[os.write(stdout_fd, data):]
        return 0
    except PluginError as exc:
        print(f"iam: error: {exc}", file=err, flush=True)
        return 1
    except OSError as exc:  # the token cache (unwritable directory, full disk, ...)
        print(f"iam: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=err, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        sys.stdout.flush()
        os.dup2(stdout_fd, 1)
        os.close(stdout_fd)
