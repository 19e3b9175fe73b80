"""kubectl logs in with iam, end to end: the real `kubectl`, iam's exec credential plugin, `iam serve` on https,
and a fake API server that checks the ID token exactly as kube-apiserver's OIDC authenticator does.

`kubectl auth whoami` runs the plugin; the first time it prints a device-flow address on stderr (kubectl passes
the plugin's stderr through), the test signs in and allows it as a browser would, and kubectl shows the user.
Then: a silent refresh after the ID token expires, two parallel kubectl calls on one refresh token (the reuse
window), a revoked refresh token and a disabled user (both: "log in again").
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import PASSWORD
from tests.fake_apiserver import FakeApiServer, OIDCAuthenticator
from tests.oauth import hidden_fields
from tests.pki import TestCA
from tests.postgres import free_port
from tests.server import iam, terminate, write_config

KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not on PATH")
ID_TOKEN_TTL = 3  # short, so that expiry and refresh happen within the test
DEVICE_PROMPT = re.compile(r"https://\S+/authn/device\?user_code=[A-Z0-9%-]+")
SESSION_ENDED = "your iam session has ended (the refresh token was revoked or expired); log in again"


@dataclass
class KubeEnv:
    directory: Path
    issuer: str
    ca: TestCA
    api: FakeApiServer
    env: dict[str, str]  # for `iam` commands against the running server's configuration and stores
    server_log: Path

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.issuer, verify=self.ca.client_context(), timeout=10)


def kubectl_client(id_token_ttl: int = ID_TOKEN_TTL) -> dict:
    return {
        "client_id": "kubectl",
        "client_name": "kubectl",
        "token_endpoint_auth_method": "none",
        "application_type": "native",
        "grant_types": ["urn:ietf:params:oauth:grant-type:device_code", "authorization_code", "refresh_token"],
        "redirect_uris": ["http://localhost:8000", "http://localhost:18000"],
        "scope": "openid profile email groups offline_access",
        "id_token_ttl": id_token_ttl,
        "refresh_token_ttl": 1200,
        "refresh_reuse_window": 5,
    }


@contextmanager
def kube_environment(directory: Path, id_token_ttl: int = ID_TOKEN_TTL):
    """`iam serve` on https (role all, SQLite) with a kubectl client and a cluster: the fake API server."""
    ca = TestCA(directory)
    iam_cert, iam_key = ca.server("iam").paths
    api_cert, api_key = ca.server("apiserver").paths
    port = free_port()
    issuer = f"https://127.0.0.1:{port}"
    authenticator = OIDCAuthenticator(issuer, "kubectl", ca_file=ca.path, username_claim="email",
                                      username_prefix="oidc:", groups_claim="groups", groups_prefix="oidc:")
    with ExitStack() as stack:
        api = stack.enter_context(FakeApiServer(authenticator, api_cert, api_key))
        config = write_config(
            directory, issuer=issuer, keys={"dir": str(directory / "keys")}, purge_interval=0,
            clients=[kubectl_client(id_token_ttl)],
            kubernetes={"clusters": [{"name": "test", "server": api.url, "client_id": "kubectl",
                                      "certificate_authority_data": base64.b64encode(ca.pem).decode()}]},
        )
        env = {
            "IAM_CONFIG": str(config),
            "SERVICE_ROLE": "all",
            **{f"IAM_{name.upper()}_DATABASE_URL": f"sqlite+aiosqlite:///{directory}/{name}.db"
               for name in ("authn", "token", "users")},
        }
        server_log = directory / "server.log"
        stack.enter_context(serve_tls(env, directory, port, iam_cert, iam_key, ca, server_log))
        yield KubeEnv(directory, issuer, ca, api, env, server_log)


@contextmanager
def serve_tls(env: dict[str, str], cwd: Path, port: int, cert: Path, key: Path, ca: TestCA, log_path: Path):
    """`iam serve` with --tls-cert/--tls-key (given through IAM_TLS_CERT/IAM_TLS_KEY), until /health/ready."""
    log = open(log_path, "w+")  # noqa: SIM115
    process = subprocess.Popen(
        [sys.executable, "-m", "iam.cli", "serve", "--port", str(port)],
        env={**os.environ, **env, "IAM_TLS_CERT": str(cert), "IAM_TLS_KEY": str(key), "IAM_DRAIN_DELAY": "0"},
        cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 30
        with httpx.Client(verify=ca.client_context(), timeout=1) as http:
            while True:
                if process.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"iam serve exited with {process.returncode}: {log.read()}")
                try:
                    if http.get(f"https://127.0.0.1:{port}/health/ready").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("iam serve did not become ready over https")
                time.sleep(0.1)
        yield process
    finally:
        terminate(process, 15)
        log.close()


def add_user(kube: KubeEnv, username="dana", email="dana@example.com", group="platform") -> str:
    added = iam("users", "add", "--username", username, "--email", email, "--email-verified", "--group", group,
                "--password-stdin", env=kube.env, cwd=kube.directory, input=PASSWORD + "\n")
    assert added.returncode == 0, added.stderr
    return added.stdout.strip()


def plugin_kubeconfig(kube: KubeEnv, cache_dir: Path) -> Path:
    """`iam kube kubeconfig`, with the plugin run by this Python, trusting the test CA, caching in tmp."""
    made = iam("kube", "kubeconfig", "--user", "dana", env=kube.env, cwd=kube.directory)
    assert made.returncode == 0, made.stderr
    config = yaml.safe_load(made.stdout)
    exec_ = config["users"][0]["user"]["exec"]
    assert exec_["command"] == "iam"
    exec_["command"] = sys.executable
    exec_["args"] = ["-m", "iam.cli", *exec_["args"], "--certificate-authority", str(kube.ca.path),
                     "--cache-dir", str(cache_dir)]
    path = kube.directory / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def approve(kube: KubeEnv, verification_uri_complete: str, username="dana", password=PASSWORD) -> None:
    """What the person does in the browser: open the address, sign in, press Allow."""
    with kube.http() as http:
        page = http.get(verification_uri_complete)
        if 'name="password"' in page.text:
            signed_in = http.post("/authn/login", data={**hidden_fields(page.text), "username": username,
                                                        "password": password})
            assert signed_in.status_code == 303, signed_in.text
            assert signed_in.headers["location"].startswith("/authn/device?")
            page = http.get(signed_in.headers["location"])
        assert page.status_code == 200 and "Allow" in page.text, page.text
        done = http.post("/authn/device", data={**hidden_fields(page.text), "decision": "approve"})
        assert done.status_code == 200 and "Device connected" in done.text, done.text


class Kubectl:
    """`kubectl auth whoami -o json` as a process, its stderr read line by line as it comes."""

    def __init__(self, kubeconfig: Path, directory: Path) -> None:
        env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBECACHEDIR": str(directory / "kubecache")}
        env.pop("KUBERNETES_EXEC_INFO", None)
        self.process = subprocess.Popen(
            [KUBECTL or "kubectl", "auth", "whoami", "-o", "json"], env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stderr: list[str] = []
        self.stdout = ""
        self._threads = [threading.Thread(target=self._read_stderr, daemon=True),
                         threading.Thread(target=self._read_stdout, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.stderr.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def _read_stdout(self) -> None:
        assert self.process.stdout is not None
        self.stdout = self.process.stdout.read()

    def wait_for(self, pattern: re.Pattern[str] | str, timeout: float = 30) -> re.Match[str]:
        pattern = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"not seen on stderr in {timeout} s: {pattern.pattern}\n{self.text}") from None
            if line is None:
                raise AssertionError(f"kubectl ended without {pattern.pattern!r}:\n{self.text}")
            if match := pattern.search(line):
                return match

    def finish(self, timeout: float = 30) -> dict:
        """Wait for kubectl to succeed; returns the SelfSubjectReview it printed."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"kubectl did not finish in {timeout} s:\n{self.text}") from None
        for thread in self._threads:
            thread.join(timeout=5)
        assert code == 0, f"kubectl exited with {code}:\n{self.text}"
        return json.loads(self.stdout)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # kubectl and the plugin it started
        self.process.wait(timeout=10)
        for thread in self._threads:
            thread.join(timeout=5)

    @property
    def text(self) -> str:
        return "".join(self.stderr)


def cached(cache_dir: Path) -> tuple[Path, dict]:
    files = [path for path in cache_dir.iterdir() if path.suffix == ".json" and not path.name.startswith(".")]
    assert len(files) == 1, files
    return files[0], json.loads(files[0].read_text())


def id_token_exp(id_token: str) -> int:
    payload = id_token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"]


def wait_past_expiry(cache_dir: Path) -> None:
    exp = id_token_exp(cached(cache_dir)[1]["id_token"])
    delay = exp - time.time() + 0.3
    assert delay < ID_TOKEN_TTL + 5
    if delay > 0:
        time.sleep(delay)


def assert_dana(review: dict) -> None:
    assert review["kind"] == "SelfSubjectReview"
    user = review["status"]["userInfo"]
    assert user["username"] == "oidc:dana@example.com"
    assert "oidc:platform" in user["groups"]


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    with kube_environment(tmp_path_factory.mktemp("kube")) as environment:
        yield environment


@needs_kubectl
def test_kubectl_logs_in_refreshes_and_asks_to_log_in_again(kube, tmp_path):
    add_user(kube)
    cache_dir = tmp_path / "cache"
    kubeconfig = plugin_kubeconfig(kube, cache_dir)

    # First use: the device flow. The address and the code are on kubectl's stderr (never on stdout).
    run = Kubectl(kubeconfig, kube.directory)
    uri = run.wait_for(DEVICE_PROMPT).group(0)
    run.wait_for("enter the code")
    approve(kube, uri)
    assert_dana(run.finish(timeout=40))
    assert "error" not in run.text.lower()
    # kubectl 1.32 sends one POST with the ID token (the gcloud kubectl dispatcher may GET /version first).
    assert [(r["method"], r["path"]) for r in kube.api.requests if r["path"] != "/version?timeout=5s"] == [
        ("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews")], kube.api.requests
    assert all(r["user"] is not None and r["error"] is None for r in kube.api.requests), kube.api.requests

    path, tokens = cached(cache_dir)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    assert tokens["issuer"] == kube.issuer and tokens["client_id"] == "kubectl" and tokens["refresh_token"]

    # The plugin alone: stdout is exactly one ExecCredential whose expiry is the ID token's exp.
    plugin = subprocess.run(
        [sys.executable, "-m", "iam.cli", "kubectl-credential", "--issuer", kube.issuer, "--client-id", "kubectl",
         "--certificate-authority", str(kube.ca.path), "--cache-dir", str(cache_dir)],
        env={**os.environ, "KUBERNETES_EXEC_INFO": json.dumps({
            "apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
            "spec": {"interactive": False}})},
        capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert plugin.returncode == 0, plugin.stderr
    credential = json.loads(plugin.stdout)
    assert plugin.stdout.count("\n") == 1
    assert credential["apiVersion"] == "client.authentication.k8s.io/v1" and credential["kind"] == "ExecCredential"
    token = credential["status"]["token"]
    exp = id_token_exp(token)
    assert credential["status"]["expirationTimestamp"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp))
    assert "user_code" not in plugin.stderr

    # (a) After the ID token expires, the plugin refreshes silently: no login prompt.
    before = cached(cache_dir)[1]["id_token"]
    wait_past_expiry(cache_dir)
    run = Kubectl(kubeconfig, kube.directory)
    assert_dana(run.finish())
    assert "user_code" not in run.text and "log in" not in run.text, run.text
    assert cached(cache_dir)[1]["id_token"] != before

    # (b) Two kubectl calls at once, right after expiry, spend the same refresh token: the reuse window gives
    # both the same successor, and the grant survives.
    wait_past_expiry(cache_dir)
    refresh_before = cached(cache_dir)[1]["refresh_token"]
    runs = [Kubectl(kubeconfig, kube.directory) for _ in range(2)]
    for each in runs:
        assert_dana(each.finish())
        assert "user_code" not in each.text and "log in" not in each.text, each.text
    assert cached(cache_dir)[1]["refresh_token"] != refresh_before
    assert "grant revoked" not in kube.server_log.read_text()

    # (c) The refresh token is revoked (RFC 7009, as the public client): the next call says so, logs in again.
    with kube.http() as http:
        revoked = http.post("/oauth/v2/revoke", data={"client_id": "kubectl",
                                                      "token": cached(cache_dir)[1]["refresh_token"]})
        assert revoked.status_code == 200
    wait_past_expiry(cache_dir)
    run = Kubectl(kubeconfig, kube.directory)
    run.wait_for(SESSION_ENDED)
    uri = run.wait_for(DEVICE_PROMPT).group(0)
    approve(kube, uri)
    assert_dana(run.finish(timeout=40))

    # (d) The user is disabled: disabling revokes their grants at once, so the refresh fails; the plugin asks to
    # log in again (and the login would fail).
    disabled = iam("users", "disable", "dana", env=kube.env, cwd=kube.directory)
    assert disabled.returncode == 0, disabled.stderr
    wait_past_expiry(cache_dir)
    run = Kubectl(kubeconfig, kube.directory)
    try:
        run.wait_for(SESSION_ENDED)
        run.wait_for(re.compile(r"the issuer said: .*(revoked|disabled)"))
        run.wait_for(DEVICE_PROMPT)
    finally:
        run.kill()
    assert not any(path.suffix == ".json" for path in cache_dir.iterdir())  # the dead session is forgotten
