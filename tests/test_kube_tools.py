"""The Kubernetes tools around kubectl login: kube-apiserver configuration, the self-test, kubeconfigs (command
and page), the exec plugin's loopback login and error handling, and the fake API server's token rules."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import yaml
from joserfc import jwt
from joserfc.jwk import OctKey, RSAKey

from iam.config import ConfigError, Settings, load_settings
from iam.kube import apiserver, selftest
from iam.kube.credential import (
    Issuer,
    Options,
    PluginError,
    TokenCache,
    check_claims,
    device_login,
    get_token,
    read_claims,
)
from tests.conftest import PASSWORD
from tests.fake_apiserver import OIDCAuthenticator, Unauthorized, server_context
from tests.oauth import hidden_fields
from tests.pki import TestCA
from tests.server import iam
from tests.test_kubectl_login import add_user, kube_environment

KUBECTL = shutil.which("kubectl")


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    with kube_environment(tmp_path_factory.mktemp("kube-tools"), id_token_ttl=120) as environment:
        add_user(environment)
        yield environment


# -- kube-apiserver configuration ------------------------------------------------------------------------
def test_apiserver_config_is_a_structured_authentication_configuration(kube):
    result = iam("kube", "apiserver-config", "--cluster", "test", env=kube.env, cwd=kube.directory)
    assert result.returncode == 0, result.stderr
    document = yaml.safe_load(result.stdout)
    assert document["apiVersion"] == "apiserver.config.k8s.io/v1beta1"
    assert document["kind"] == "AuthenticationConfiguration"
    [jwt_config] = document["jwt"]
    assert jwt_config["issuer"]["url"] == kube.issuer  # exactly: no trailing slash added or removed
    assert jwt_config["issuer"]["audiences"] == ["kubectl"]
    assert "audienceMatchPolicy" not in jwt_config["issuer"]  # one audience
    assert jwt_config["claimMappings"] == {"username": {"claim": "email", "prefix": "oidc:"},
                                           "groups": {"claim": "groups", "prefix": "oidc:"}}
    [rule] = jwt_config["claimValidationRules"]
    assert rule["expression"] == "claims.email_verified == true"


def test_apiserver_config_flags(kube):
    result = iam("kube", "apiserver-config", "--format", "flags", env=kube.env, cwd=kube.directory)
    assert result.returncode == 0, result.stderr
    flags = yaml.safe_load(result.stdout)  # a YAML list: the static pod's command entries
    assert flags == [
        f"--oidc-issuer-url={kube.issuer}",
        "--oidc-client-id=kubectl",
        "--oidc-username-claim=email",
        "--oidc-username-prefix=oidc:",
        "--oidc-groups-claim=groups",
        "--oidc-groups-prefix=oidc:",
        "--oidc-signing-algs=RS256",
    ]


def kube_settings(**cluster) -> Settings:
    return Settings.model_validate({
        "issuer": "https://iam.example.com/application/o/k8s/",
        "clients": [{"client_id": "kubectl", "token_endpoint_auth_method": "none", "scope": "openid email groups",
                     "grant_types": ["urn:ietf:params:oauth:grant-type:device_code", "refresh_token"]},
                    {"client_id": "web", "client_secret": "web-secret-0123456789", "redirect_uris": ["https://w/cb"],
                     "scope": "openid"}],
        "kubernetes": {"clusters": [{"name": "prod", "server": "https://k8s.example.com:6443",
                                     "client_id": "kubectl", **cluster}]},
    })


def test_structured_config_with_several_audiences_and_an_in_cluster_discovery_url():
    settings = kube_settings(audiences=["kubectl", "other"], username_claim="sub", username_prefix="",
                             discovery_url="https://iam.iam.svc/application/o/k8s/.well-known/openid-configuration")
    document = apiserver.authentication_configuration(settings, settings.kubernetes.clusters[0])
    issuer = document["jwt"][0]["issuer"]
    assert issuer["url"] == "https://iam.example.com/application/o/k8s/"  # the trailing slash is kept
    assert issuer["discoveryURL"].startswith("https://iam.iam.svc/")
    assert issuer["audiences"] == ["kubectl", "other"] and issuer["audienceMatchPolicy"] == "MatchAny"
    assert "claimValidationRules" not in document["jwt"][0]  # the username is not the email
    flags = apiserver.flags(settings, settings.kubernetes.clusters[0])
    assert "--oidc-username-prefix=-" in flags  # empty prefix: "-", or kube-apiserver prefixes `issuer#`


@pytest.mark.parametrize("cluster,fragment", [
    ({"client_id": "nope"}, "kubernetes.clusters.0.client_id: no client 'nope' in clients"),
    ({"client_id": "web"}, "kubernetes.clusters.0.client_id: client 'web' must be public"),
    ({"server": "http://k8s:8080"}, "kubernetes.clusters.0.server: must be an absolute https URL"),
    ({"certificate_authority_data": "not base64!"}, "kubernetes.clusters.0.certificate_authority_data"),
])
def test_cluster_configuration_errors_name_the_field(tmp_path, cluster, fragment):
    text = yaml.safe_dump({
        "issuer": "https://iam.example.com",
        "clients": [{"client_id": "kubectl", "token_endpoint_auth_method": "none", "scope": "openid",
                     "grant_types": ["urn:ietf:params:oauth:grant-type:device_code"]},
                    {"client_id": "web", "client_secret": "web-secret-0123456789", "scope": "openid",
                     "grant_types": ["client_credentials"]}],
        "kubernetes": {"clusters": [{"name": "prod", "server": "https://k8s:6443", "client_id": "kubectl",
                                     **cluster}]},
    })
    path = tmp_path / "iam.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_settings(path, env={})
    assert fragment in str(error.value)


# -- the plugin's loopback login, then the self-test --------------------------------------------------
def loopback_login(kube, cache_dir: Path) -> tuple[dict, str]:
    """`iam kubectl-credential --grant loopback`, the browser played with httpx. Returns (ExecCredential, stderr)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "iam.cli", "kubectl-credential", "--grant", "loopback", "--issuer", kube.issuer,
         "--client-id", "kubectl", "--certificate-authority", str(kube.ca.path), "--cache-dir", str(cache_dir)],
        env={**os.environ, "BROWSER": "true"},  # webbrowser.open runs `true URL`: no real browser
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 30
        assert process.stderr is not None
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            lines.append(line)
            if match := re.search(r"https://\S+/oauth/v2/authorize\?\S+", line):
                break
            assert line, "".join(lines)
        else:
            raise AssertionError("no authorization URL on stderr")
        with kube.http() as http:
            page = http.get(match.group(0), follow_redirects=True)
            assert 'name="password"' in page.text, page.text
            done = http.post("/authn/login", data={**hidden_fields(page.text), "username": "dana",
                                                   "password": PASSWORD}, follow_redirects=True)
            assert done.url.host == "localhost" and done.status_code == 200, done.text
            assert "Logged in" in done.text
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, "".join(lines) + stderr
    return json.loads(stdout), "".join(lines) + stderr


def test_loopback_login_then_selftest_passes(kube, tmp_path):
    credential, stderr = loopback_login(kube, tmp_path / "cache")
    assert credential["kind"] == "ExecCredential"
    url = re.search(r"https://\S+/oauth/v2/authorize\?\S+", stderr).group(0)
    assert "code_challenge_method=S256" in url and "state=" in url and "nonce=" in url
    assert "redirect_uri=http%3A%2F%2Flocalhost%3A" in url
    id_token = credential["status"]["token"]

    # The next call is served from the cache, without any login.
    again = iam("kubectl-credential", "--issuer", kube.issuer, "--client-id", "kubectl", "--grant", "loopback",
                "--certificate-authority", str(kube.ca.path), "--cache-dir", str(tmp_path / "cache"), timeout=30)
    assert again.returncode == 0 and again.stderr == "", again.stderr
    assert json.loads(again.stdout)["status"]["token"] == id_token

    result = iam("kube", "selftest", "--cluster", "test", "--certificate-authority", str(kube.ca.path),
                 "--id-token", id_token, env=kube.env, cwd=kube.directory)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "all checks passed"
    assert all(line.startswith("PASS ") for line in lines[:-1]), result.stdout
    names = {line.split(":")[0].removeprefix("PASS ") for line in lines[:-1]}
    assert names >= {"issuer https", "discovery issuer", "jwks", "signing algorithm", "device flow", "pkce",
                     "id token signature", "id token iss", "id token aud", "id token exp", "id token username",
                     "id token email_verified", "id token groups"}

    # The same token, checked against other expectations: each failure says exactly why.
    target = selftest.Target(kube.issuer, "someone-else")
    tampered = id_token[:-4] + ("AAAA" if not id_token.endswith("AAAA") else "BBBB")
    checks = {c.name: c for c in selftest.run(target, certificate_authority=str(kube.ca.path), id_token=tampered)}
    assert checks["id token signature"].status == "FAIL"
    assert checks["id token aud"].status == "FAIL"
    assert "does not contain the client id 'someone-else'" in checks["id token aud"].detail


def test_logout_revokes_the_cached_refresh_token_and_forgets_the_cache(kube, tmp_path):
    cache_dir = tmp_path / "cache"
    loopback_login(kube, cache_dir)
    (cache_file,) = cache_dir.glob("*.json")
    refresh_token = json.loads(cache_file.read_text())["refresh_token"]
    args = ["kubectl-credential", "--issuer", kube.issuer, "--client-id", "kubectl", "--certificate-authority",
            str(kube.ca.path), "--cache-dir", str(cache_dir), "--logout"]

    result = iam(*args, timeout=30)
    assert result.returncode == 0 and result.stdout == "", result.stderr
    assert f"logged out of {kube.issuer}" in result.stderr
    assert not cache_file.exists()
    with kube.http() as http:
        refreshed = http.post("/oauth/v2/token", data={"grant_type": "refresh_token", "refresh_token": refresh_token,
                                                       "client_id": "kubectl"})
    assert refreshed.json()["error"] == "invalid_grant"  # revoked at the issuer, not only forgotten here
    again = iam(*args, timeout=30)
    assert again.returncode == 0 and "no cached login" in again.stderr


def test_logout_keeps_the_cache_when_the_issuer_cannot_be_told(tmp_path):
    from iam.kube.credential import Options, TokenCache, logout

    cache = TokenCache(tmp_path, ISSUER, "kubectl", "openid")
    cache.save("id.token.here", "a-refresh-token")
    calls: list = []
    http = scripted({"/revoke": [httpx.Response(503)]}, calls)
    err = io.StringIO()
    assert logout(Options(ISSUER, "kubectl", scope="openid", cache_dir=tmp_path), err, http) == 1
    assert "HTTP 503" in err.getvalue() and cache.load() is not None
    assert ("/revoke", {"token": "a-refresh-token", "token_type_hint": "refresh_token", "client_id": "kubectl"}) \
        in calls


def test_selftest_fails_on_a_trailing_slash_mismatch_and_an_untrusted_ca(kube):
    result = iam("kube", "selftest", "--issuer", kube.issuer + "/", "--certificate-authority", str(kube.ca.path),
                 env=kube.env, cwd=kube.directory)
    assert result.returncode == 1
    assert (f"FAIL discovery issuer: discovery says issuer '{kube.issuer}' but the issuer URL is "
            f"'{kube.issuer}/'; kube-apiserver requires them to match byte for byte (trailing slash included)"
            in result.stdout), result.stdout
    assert "PASS jwks" in result.stdout

    untrusted = iam("kube", "selftest", env=kube.env, cwd=kube.directory)
    assert untrusted.returncode == 1
    assert re.search(r"FAIL discovery: cannot fetch \S+: .*CERTIFICATE_VERIFY_FAILED.*--certificate-authority",
                     untrusted.stdout), untrusted.stdout
    assert "SKIP jwks: needs the discovery document" in untrusted.stdout


@contextmanager
def static_issuer(tls: tuple[Path, Path] | None = None, issuer_suffix: str = ""):
    """A tiny issuer serving fixed JSON documents; `documents` is filled in once the URL is known."""
    documents: dict[str, dict] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = documents.get(self.path)
            data = json.dumps(body).encode()
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls:
        server.socket = server_context(*tls).wrap_socket(server.socket, server_side=True)
    base = f"{'https' if tls else 'http'}://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield base, documents
    finally:
        server.shutdown()
        server.server_close()


def test_selftest_fails_on_an_http_issuer(kube):
    with kube.http() as http:
        metadata = http.get("/.well-known/openid-configuration").json()
        jwks = http.get("/oauth/v2/jwks").json()
    with static_issuer() as (base, documents):
        documents["/.well-known/openid-configuration"] = {
            **{key: value.replace(kube.issuer, base) if isinstance(value, str) else value
               for key, value in metadata.items()}}
        documents["/oauth/v2/jwks"] = jwks
        result = iam("kube", "selftest", "--issuer", base, "--client-id", "kubectl", env=kube.env, cwd=kube.directory)
    assert result.returncode == 1
    assert f"FAIL issuer https: {base} is not https: kube-apiserver accepts only an https issuer URL" in result.stdout
    assert f"FAIL device flow: device_authorization_endpoint {base}/oauth/v2/device_authorization is not https" \
        in result.stdout
    assert "PASS discovery issuer" in result.stdout and "PASS jwks" in result.stdout


# -- kubeconfig: command, commands, page ----------------------------------------------------------------
def test_kubeconfig_page_needs_sign_in_and_offers_the_kubeconfig(kube):
    with kube.http() as http:
        anonymous = http.get("/authn/kubeconfig")
        assert anonymous.status_code == 303 and anonymous.headers["location"] == "/authn/login"
        assert http.get("/authn/kubeconfig.yaml").status_code == 303

        form = http.get("/authn/login")
        signed_in = http.post("/authn/login", data={**hidden_fields(form.text), "username": "dana",
                                                    "password": PASSWORD})
        assert signed_in.status_code == 303 and signed_in.headers["location"] == "/authn/account"
        account = http.get("/authn/account")
        assert '<a href="/authn/kubeconfig">Get a kubeconfig</a>' in account.text

        page = http.get("/authn/kubeconfig")
        assert page.status_code == 200 and 'class="wide"' in page.text
        assert page.headers["cache-control"] == "no-store"
        assert "kubectl-credential" in page.text and kube.issuer in page.text
        assert "kubectl config set-credentials" in page.text
        assert '<a href="/authn/kubeconfig.yaml"' in page.text

        download = http.get("/authn/kubeconfig.yaml")
        assert download.status_code == 200
        assert download.headers["content-disposition"] == 'attachment; filename="kubeconfig.yaml"'
        assert download.headers["content-type"].startswith("application/yaml")
    config = yaml.safe_load(download.text)
    assert config["current-context"] == "test"
    [cluster] = config["clusters"]
    assert cluster["cluster"]["server"] == kube.api.url
    assert base64.b64decode(cluster["cluster"]["certificate-authority-data"]) == kube.ca.pem
    [user] = config["users"]
    assert user["name"] == "dana@test"
    exec_ = user["user"]["exec"]
    assert exec_ == {"apiVersion": "client.authentication.k8s.io/v1", "command": "iam",
                     "args": ["kubectl-credential", "--issuer", kube.issuer, "--client-id", "kubectl"],
                     "interactiveMode": "IfAvailable", "provideClusterInfo": False}
    assert config["contexts"] == [{"name": "test", "context": {"cluster": "test", "user": "dana@test"}}]


@pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH")
def test_kubectl_config_commands_write_the_same_kubeconfig(kube, tmp_path):
    made = iam("kube", "kubeconfig", "--user", "dana", env=kube.env, cwd=kube.directory)
    commands = iam("kube", "kubeconfig", "--user", "dana", "--commands", env=kube.env, cwd=kube.directory)
    assert made.returncode == 0 and commands.returncode == 0, made.stderr + commands.stderr
    env = {**os.environ, "KUBECONFIG": str(tmp_path / "config")}
    ran = subprocess.run(["sh", "-e", "-c", commands.stdout], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=60)
    assert ran.returncode == 0, ran.stderr
    written = json.loads(subprocess.run([KUBECTL, "config", "view", "--raw", "-o", "json"], env=env,
                                        capture_output=True, text=True, timeout=30, check=True).stdout)
    expected = yaml.safe_load(made.stdout)
    assert written["current-context"] == expected["current-context"]
    assert written["clusters"] == expected["clusters"]
    assert written["contexts"] == expected["contexts"]
    [user] = written["users"]
    assert user["name"] == expected["users"][0]["name"]
    assert {k: v for k, v in user["user"]["exec"].items() if v is not None} == expected["users"][0]["user"]["exec"]


# -- the plugin's protocol handling, against a scripted issuer ------------------------------------------
ISSUER = "https://iam.example.com"


def id_token(**claims) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": "kubectl", "sub": "u1", "iat": now, "exp": now + 300, **claims}
    return jwt.encode({"alg": "RS256", "kid": "k"}, body, RSA_KEY)


def scripted(responses: dict[str, list[httpx.Response]], calls: list) -> httpx.Client:
    metadata = {"issuer": ISSUER, "token_endpoint": f"{ISSUER}/token",
                "device_authorization_endpoint": f"{ISSUER}/device", "revocation_endpoint": f"{ISSUER}/revoke"}

    def handle(request: httpx.Request) -> httpx.Response:
        calls.append((request.url.path, dict(httpx.QueryParams(request.content.decode()))))
        if request.url.path == "/.well-known/openid-configuration":
            return httpx.Response(200, json=metadata)
        return responses[request.url.path].pop(0)

    return httpx.Client(transport=httpx.MockTransport(handle))


def oauth_error(error: str) -> httpx.Response:
    return httpx.Response(400, json={"error": error, "error_description": f"{error} described"})


def device_started() -> httpx.Response:
    return httpx.Response(200, json={"device_code": "dc", "user_code": "BCDF-GHJK", "expires_in": 600,
                                     "verification_uri": f"{ISSUER}/authn/device", "interval": 1,
                                     "verification_uri_complete": f"{ISSUER}/authn/device?user_code=BCDF-GHJK"})


def test_device_login_polls_as_rfc_8628_says():
    calls: list = []
    token = id_token()
    http = scripted({"/device": [device_started()], "/token": [
        oauth_error("authorization_pending"), oauth_error("slow_down"),
        httpx.Response(200, json={"id_token": token, "refresh_token": "r1", "access_token": "a"})]}, calls)
    options = Options(ISSUER, "kubectl")
    issuer = Issuer(options, http)
    issuer.discover()
    sleeps: list[float] = []
    err = io.StringIO()
    tokens = device_login(issuer, options, err, sleep=sleeps.append)
    assert tokens["id_token"] == token
    assert sleeps == [1.25, 1.25, 6.25]  # the interval, then 5 s more after slow_down
    assert f"{ISSUER}/authn/device?user_code=BCDF-GHJK" in err.getvalue() and "BCDF-GHJK" in err.getvalue()
    assert calls[1] == ("/device", {"client_id": "kubectl", "scope": "openid email groups offline_access"})
    assert calls[2][1] == {"grant_type": "urn:ietf:params:oauth:grant-type:device_code", "device_code": "dc",
                           "client_id": "kubectl"}


@pytest.mark.parametrize("error,message", [("access_denied", "the login was denied"),
                                           ("expired_token", "the login code expired")])
def test_device_login_stops_on_denial_and_expiry(error, message):
    http = scripted({"/device": [device_started()], "/token": [oauth_error(error)]}, [])
    options = Options(ISSUER, "kubectl")
    issuer = Issuer(options, http)
    issuer.discover()
    with pytest.raises(PluginError, match=message):
        device_login(issuer, options, io.StringIO(), sleep=lambda _: None)


def test_a_refused_refresh_token_forgets_the_session_and_logs_in_again(tmp_path):
    options = Options(ISSUER, "kubectl", cache_dir=tmp_path / "cache")
    cache = TokenCache(tmp_path / "cache", ISSUER, "kubectl", options.scope)
    cache.save(id_token(exp=int(time.time()) - 10, iat=int(time.time()) - 70), "old-refresh")
    new = id_token()
    calls: list = []
    http = scripted({"/token": [oauth_error("invalid_grant"),
                                httpx.Response(200, json={"id_token": new, "refresh_token": "r2"})],
                     "/device": [device_started()]}, calls)
    err = io.StringIO()
    token, claims = get_token(options, err, http=http)
    assert token == new
    assert calls[1] == ("/token", {"grant_type": "refresh_token", "refresh_token": "old-refresh",
                                   "client_id": "kubectl"})
    assert "your iam session has ended (the refresh token was revoked or expired); log in again" in err.getvalue()
    assert "invalid_grant described" in err.getvalue()
    assert cache.load()["refresh_token"] == "r2"


def test_id_tokens_for_another_client_or_issuer_are_refused():
    options = Options(ISSUER, "kubectl")
    check_claims(read_claims(id_token()), options)
    with pytest.raises(PluginError, match="does not contain the client id 'kubectl'"):
        check_claims(read_claims(id_token(aud="other")), options)
    with pytest.raises(PluginError, match="is not the issuer"):
        check_claims(read_claims(id_token(iss=ISSUER + "/")), options)


# -- the fake API server's authenticator ----------------------------------------------------------------
RSA_KEY = RSAKey.generate_key(2048, parameters={"kid": "k", "alg": "RS256", "use": "sig"})
OTHER_KEY = RSAKey.generate_key(2048, parameters={"kid": "k", "alg": "RS256", "use": "sig"})


@pytest.fixture(scope="module")
def token_issuer(tmp_path_factory):
    """An https issuer (discovery and a JWKS with RSA_KEY) and an authenticator configured for it."""
    directory = tmp_path_factory.mktemp("issuer")
    ca = TestCA(directory)
    with static_issuer(ca.server("issuer").paths) as (base, documents):
        documents["/.well-known/openid-configuration"] = {"issuer": base, "jwks_uri": f"{base}/jwks"}
        documents["/jwks"] = {"keys": [RSA_KEY.as_dict(private=False)]}
        authenticator = OIDCAuthenticator(base, "kubectl", ca_file=ca.path, username_claim="email",
                                          username_prefix="oidc:", groups_claim="groups", groups_prefix="oidc:")
        yield base, authenticator, ca


def sign(base: str, header: dict | None = None, key=RSA_KEY, **claims) -> str:
    now = int(time.time())
    body = {"iss": base, "aud": "kubectl", "sub": "u1", "iat": now, "exp": now + 60, "email": "dana@example.com",
            "email_verified": True, "groups": ["platform"], **claims}
    body = {name: value for name, value in body.items() if value is not None}
    return jwt.encode(header or {"alg": "RS256", "kid": "k"}, body, key)


def unsigned(base: str) -> str:
    def part(value: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    claims = {"iss": base, "aud": "kubectl", "exp": int(time.time()) + 60, "email": "dana@example.com"}
    return f"{part({'alg': 'none'})}.{part(claims)}."


def test_fake_apiserver_accepts_a_valid_token(token_issuer):
    base, authenticator, _ = token_issuer
    user = authenticator.authenticate(sign(base))
    assert user.username == "oidc:dana@example.com" and user.groups == ["oidc:platform"]
    assert authenticator.authenticate(sign(base, email_verified=None)).username == "oidc:dana@example.com"
    assert authenticator.authenticate(sign(base, groups="solo")).groups == ["oidc:solo"]
    assert authenticator.authenticate(sign(base, aud=["other", "kubectl"])).username == "oidc:dana@example.com"


@pytest.mark.parametrize("make,reason", [
    (lambda base: sign(base, {"alg": "HS256"}, OctKey.generate_key(256)), "unsupported algorithm"),
    (unsigned, "unsupported algorithm"),
    (lambda base: sign(base, key=OTHER_KEY), "failed to verify signature"),
    (lambda base: sign(base, aud="someone-else"), "expected audience"),
    (lambda base: sign(base, iss=base + "/"), "is not the issuer"),
    (lambda base: sign(base, exp=int(time.time()) - 1), "token is expired"),
    (lambda base: sign(base, nbf=int(time.time()) + 600), "before the nbf"),
    (lambda base: sign(base, email_verified=False), "email not verified"),
    (lambda base: sign(base, email=None), "parse username claims 'email': claim not present"),
    (lambda base: sign(base, groups=[1, 2]), "parse groups claim"),
    (lambda base: "not.a.jwt", "malformed jwt"),
])
def test_fake_apiserver_rejects_what_kube_apiserver_rejects(token_issuer, make, reason):
    base, authenticator, _ = token_issuer
    with pytest.raises(Unauthorized, match=re.escape(reason)):
        authenticator.authenticate(make(base))


def test_fake_apiserver_checks_the_discovery_issuer_and_tls(token_issuer, tmp_path):
    base, _, ca = token_issuer
    slash = OIDCAuthenticator(base + "/", "kubectl", ca_file=ca.path, username_claim="email")
    with pytest.raises(Unauthorized, match="issuer did not match the issuer returned by provider"):
        slash.authenticate(sign(base, iss=base + "/"))
    untrusted = OIDCAuthenticator(base, "kubectl", ca_file=TestCA(tmp_path).path, username_claim="email")
    with pytest.raises(Unauthorized, match="CERTIFICATE_VERIFY_FAILED"):
        untrusted.authenticate(sign(base))
    with pytest.raises(ValueError, match="https"):
        OIDCAuthenticator("http://127.0.0.1:1", "kubectl")
