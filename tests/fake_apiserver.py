"""A stand-in for kube-apiserver in tests: its OIDC token authenticator, rule for rule, behind just enough of
the API for `kubectl auth whoami`; plus a throw-away certificate authority for https on 127.0.0.1.

The authenticator does what kube-apiserver's (staging/src/k8s.io/apiserver/plugin/pkg/authenticator/token/oidc)
does with go-oidc:

- the issuer URL must be https; the token's unverified `iss` must equal it, or the token is not for us;
- discovery is fetched from `{issuer without trailing slash}/.well-known/openid-configuration` over https,
  verifying the issuer's certificate with the configured CA only, and its `issuer` must equal the issuer URL
  byte for byte ("oidc: issuer did not match the issuer returned by provider");
- the signature is checked with the JWKS from `jwks_uri` (refetched when a kid is unknown), with only the
  allowed algorithms (RS256 by default: never HS256 or none);
- `iss` exact, `aud` contains the client id (any of the audiences), `exp` in the future (no leeway, as
  go-oidc), `nbf` (if present) not more than 5 minutes ahead;
- the username from the configured claim; for `email`, `email_verified` must be true when it is present;
  the prefix is applied (default: none for email, `issuer#` otherwise, "-" for none);
- groups from the configured claim: an array of strings or a single string; the prefix on each.

kubectl sends a bearer token only over https, so the fake API server serves https too. What `kubectl auth
whoami` (1.32) sends: `GET /version?timeout=5s`, then `POST /apis/authentication.k8s.io/v1/selfsubjectreviews`
with a protobuf body (Accept: protobuf, then JSON); both with `Authorization: Bearer <ID token>`.
"""

from __future__ import annotations

import json
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet
from joserfc.jws import extract_compact

NBF_LEEWAY = 300  # go-oidc: "5 minutes since this is what other OpenID Connect providers do"


# -- TLS for the fake API server (its certificates: tests/pki.py) -----------------------------------------
def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


# -- kube-apiserver's OIDC authenticator ---------------------------------------------------------------
class Unauthorized(Exception):  # noqa: N818 - the HTTP status it becomes
    """The token does not authenticate; the message is the reason kube-apiserver would log."""


@dataclass(frozen=True)
class UserInfo:
    username: str
    groups: list[str]


@dataclass
class OIDCAuthenticator:
    issuer_url: str
    client_id: str
    ca_file: str | Path | None = None  # --oidc-ca-file: the only roots trusted for the issuer
    username_claim: str = "sub"
    username_prefix: str | None = None  # None: kube's default ("" for email, "issuer#" otherwise); "-": none
    groups_claim: str | None = None
    groups_prefix: str = ""
    signing_algs: tuple[str, ...] = ("RS256",)
    audiences: tuple[str, ...] = ()  # structured config (MatchAny); default: the client id
    required_claims: dict[str, str] = field(default_factory=dict)
    discovery_url: str | None = None
    _provider: dict | None = field(default=None, repr=False)
    _keys: KeySet | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        # kube-apiserver refuses to start otherwise: "issuer URL must use https scheme"
        if not self.issuer_url.startswith("https://"):
            raise ValueError(f"--oidc-issuer-url {self.issuer_url!r} must use the https scheme")
        for alg in self.signing_algs:
            if alg not in ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"):
                raise ValueError(f"--oidc-signing-algs: {alg} is not supported")

    # go-oidc's NewProvider + RemoteKeySet
    def _http(self) -> httpx.Client:
        verify = ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else True
        return httpx.Client(verify=verify, timeout=5.0, follow_redirects=False)

    def provider(self) -> dict:
        with self._lock:
            if self._provider is None:
                url = self.discovery_url or self.issuer_url.rstrip("/") + "/.well-known/openid-configuration"
                try:
                    with self._http() as http:
                        response = http.get(url)
                except httpx.TransportError as exc:
                    raise Unauthorized(f"oidc: fetching discovery from {url}: {exc}") from None
                if response.status_code != 200:
                    raise Unauthorized(f"oidc: {url}: {response.status_code}")
                document = response.json()
                if document.get("issuer") != self.issuer_url:
                    raise Unauthorized("oidc: issuer did not match the issuer returned by provider, expected "
                                       f"{self.issuer_url!r} got {document.get('issuer')!r}")
                if not isinstance(document.get("jwks_uri"), str):
                    raise Unauthorized("oidc: discovery has no jwks_uri")
                self._provider = document
            return self._provider

    def _key_set(self, refresh: bool) -> KeySet:
        with self._lock:
            if self._keys is None or refresh:
                assert self._provider is not None
                try:
                    with self._http() as http:
                        response = http.get(self._provider["jwks_uri"])
                    self._keys = KeySet.import_key_set(response.json())
                except (httpx.TransportError, ValueError, JoseError) as exc:
                    raise Unauthorized(f"oidc: fetching keys: {exc}") from None
            return self._keys

    def authenticate(self, token: str) -> UserInfo:
        try:
            compact = extract_compact(token.encode())
            header = compact.headers()
            unverified = json.loads(compact.payload)
        except (JoseError, ValueError, TypeError) as exc:
            raise Unauthorized(f"oidc: malformed jwt: {exc}") from None
        if not isinstance(unverified, dict) or unverified.get("iss") != self.issuer_url:
            # hasCorrectIssuer: not a token for this authenticator (the request ends as 401)
            raise Unauthorized(f"token iss {unverified.get('iss')!r} is not the issuer {self.issuer_url!r}")
        self.provider()
        alg = header.get("alg")
        if alg not in self.signing_algs:
            raise Unauthorized(f"oidc: id token signed with unsupported algorithm, expected "
                               f"{list(self.signing_algs)} got {alg!r}")
        claims = self._verify_signature(token, header)
        if claims.get("iss") != self.issuer_url:
            raise Unauthorized(f"oidc: id token issued by a different provider, expected {self.issuer_url!r} "
                               f"got {claims.get('iss')!r}")
        audience = claims.get("aud")
        audiences = [audience] if isinstance(audience, str) else audience if isinstance(audience, list) else []
        expected = self.audiences or (self.client_id,)
        if not set(expected) & set(audiences):
            raise Unauthorized(f"oidc: expected audience {list(expected)} got {audience!r}")
        now = time.time()
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or exp < now:
            raise Unauthorized(f"oidc: token is expired (Token Expiry: {exp})")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and now + NBF_LEEWAY < nbf:
            raise Unauthorized(f"oidc: current time before the nbf (not before) time: {nbf}")
        for name, value in self.required_claims.items():
            if claims.get(name) != value:
                raise Unauthorized(f"oidc: required claim {name} value does not match")
        return UserInfo(self._username(claims), self._groups(claims))

    def _verify_signature(self, token: str, header: dict) -> dict:
        for refresh in (False, True):
            keys = self._key_set(refresh)
            if header.get("kid") is not None and not any(key.kid == header["kid"] for key in keys.keys):
                continue  # unknown kid: refetch the JWKS once
            try:
                return jwt.decode(token, keys, algorithms=list(self.signing_algs)).claims
            except (JoseError, ValueError, TypeError) as exc:
                if refresh:
                    raise Unauthorized(f"oidc: failed to verify signature: {exc}") from None
        raise Unauthorized(f"oidc: failed to verify signature: no key with kid {header.get('kid')!r}")

    def _username(self, claims: dict) -> str:
        value = claims.get(self.username_claim)
        if not isinstance(value, str):
            raise Unauthorized(f"oidc: parse username claims {self.username_claim!r}: "
                               + ("claim not present" if value is None else "not a string"))
        if self.username_claim == "email" and "email_verified" in claims:
            # present: it must be true (kubernetes#36087, relaxed for absence in #61508)
            if claims["email_verified"] is not True:
                raise Unauthorized("oidc: email not verified")
        prefix = self.username_prefix
        if prefix is None:
            prefix = "" if self.username_claim == "email" else f"{self.issuer_url}#"
        elif prefix == "-":
            prefix = ""
        return prefix + value

    def _groups(self, claims: dict) -> list[str]:
        if not self.groups_claim or self.groups_claim not in claims:
            return []
        value = claims[self.groups_claim]
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(group, str) for group in value):
            raise Unauthorized(f"oidc: parse groups claim {self.groups_claim!r}: not a string or an array of strings")
        return [self.groups_prefix + group for group in value]


# -- the API server ------------------------------------------------------------------------------------
def _status(code: int, reason: str, message: str) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}


VERSION = {"major": "1", "minor": "32", "gitVersion": "v1.32.0-fake", "gitCommit": "fake", "gitTreeState": "clean",
           "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23", "compiler": "gc", "platform": "linux/amd64"}
AUTHN_GROUP = {"name": "authentication.k8s.io",
               "versions": [{"groupVersion": "authentication.k8s.io/v1", "version": "v1"}],
               "preferredVersion": {"groupVersion": "authentication.k8s.io/v1", "version": "v1"}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeApiServer

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)  # a protobuf SelfSubjectReview from kubectl; nothing in it matters
        path = self.path.split("?", 1)[0]
        authorization = self.headers.get("Authorization")
        record = {"method": self.command, "path": self.path, "bearer": None, "user": None, "error": None}
        self.server.requests.append(record)
        user = None
        if authorization is not None:
            scheme, _, token = authorization.partition(" ")
            record["bearer"] = token if scheme.lower() == "bearer" else None
            try:
                if scheme.lower() != "bearer" or not token:
                    raise Unauthorized("not a bearer token")
                user = self.server.authenticator.authenticate(token.strip())
                record["user"] = user
            except Unauthorized as exc:
                record["error"] = str(exc)
                self._send(401, _status(401, "Unauthorized", "Unauthorized"))
                return
        if self.command == "GET" and path == "/version":
            self._send(200, VERSION)
        elif self.command == "GET" and path == "/api":
            self._send(200, {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.server.server_address[1]}"}]})
        elif self.command == "GET" and path == "/apis":
            self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [AUTHN_GROUP]})
        elif self.command == "GET" and path == "/apis/authentication.k8s.io/v1":
            self._send(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "authentication.k8s.io/v1",
                             "resources": [{"name": "selfsubjectreviews", "singularName": "selfsubjectreview",
                                            "namespaced": False, "kind": "SelfSubjectReview", "verbs": ["create"]}]})
        elif self.command == "POST" and path == "/apis/authentication.k8s.io/v1/selfsubjectreviews":
            if user is None:  # as with --anonymous-auth=false
                record["error"] = "no credentials"
                self._send(401, _status(401, "Unauthorized", "Unauthorized"))
                return
            self._send(201, {"kind": "SelfSubjectReview", "apiVersion": "authentication.k8s.io/v1",
                             "metadata": {"creationTimestamp": None},
                             "status": {"userInfo": {"username": user.username,
                                                     "groups": [*user.groups, "system:authenticated"]}}})
        else:
            self._send(404, _status(404, "NotFound", f"the server could not find the requested resource ({path})"))

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _handle  # noqa: N815

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        pass


class FakeApiServer(ThreadingHTTPServer):
    """`with FakeApiServer(authenticator, cert, key) as api:` serves https on 127.0.0.1 at `api.url`."""

    daemon_threads = True

    def __init__(self, authenticator: OIDCAuthenticator, cert: Path, key: Path, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.authenticator = authenticator
        self.requests: list[dict] = []
        self.socket = server_context(cert, key).wrap_socket(self.socket, server_side=True)
        self._thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> FakeApiServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=5)
