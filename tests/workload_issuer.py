"""Issuers of workload tokens, over real HTTP: a Kubernetes service-account token issuer and a SPIFFE one.

There is no kube-apiserver here, so `ServiceAccountIssuer` mints tokens the way it does, following:
- Kubernetes docs, "Configure Service Accounts for Pods", sections "Service account token volume projection"
  and "Service account issuer discovery"
  (https://kubernetes.io/docs/tasks/configure-pod-container/configure-service-account/): a projected token
  carries the volume's `audience` and lasts `expirationSeconds` (default 1 h, at least 10 min); the issuer
  serves `/.well-known/openid-configuration` and the JWKS at `/openid/v1/jwks`;
- Kubernetes docs, "Managing Service Accounts" (https://kubernetes.io/docs/reference/access-authn-authz/
  service-accounts-admin/) and "Service Accounts" / bound tokens: the claims `iss`, `sub`
  (`system:serviceaccount:<namespace>:<name>`), `aud` (a list), `exp`, `iat`, `nbf`, `jti`, and
  `kubernetes.io` {namespace, serviceaccount {name, uid}, pod {name, uid}, node {name, uid}} for a pod-bound
  token;
- KEP-1393 "OIDC discovery for service account token issuer" (kubernetes/enhancements,
  keps/sig-auth/1393-oidc-discovery): the discovery document (issuer, jwks_uri, response_types_supported
  ["id_token"], subject_types_supported ["public"], id_token_signing_alg_values_supported), keys as JWKs with
  `use: sig`; kube-apiserver's `kid` is base64url (unpadded) of the SHA-256 of the public key's PKIX DER
  (k8s.io/kubernetes pkg/serviceaccount/jwt.go keyIDFromPublicKey), RS256 for RSA keys and ES256 for P-256.

`SpiffeIssuer` mints JWT-SVIDs (SPIFFE JWT-SVID §3: sub a SPIFFE ID, aud, exp, iat; alg RS256/ES256) and
writes its trust bundle (SPIFFE Trust Domain and Bundle §4: a JWK Set, JWT authorities with `use: jwt-svid`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from tests.postgres import free_port


def kube_key_id(key: RSAKey | ECKey) -> str:
    """kube-apiserver's kid: base64url(SHA-256(PKIX DER of the public key)), unpadded."""
    der = key.public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()


def _keys() -> dict[str, RSAKey | ECKey]:
    rsa = RSAKey.generate_key(2048, private=True)
    ec = ECKey.generate_key("P-256", private=True)
    return {"RS256": rsa, "ES256": ec}


class ServiceAccountIssuer:
    """A kube-apiserver's service-account token issuer, its discovery and JWKS served on a loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.keys = _keys()
        self.kids = {alg: kube_key_id(key) for alg, key in self.keys.items()}
        self.hits: dict[str, int] = {}
        self.down = False  # answer 503 to everything (an unreachable control plane)
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                issuer.hits[self.path] = issuer.hits.get(self.path, 0) + 1
                documents = {"/.well-known/openid-configuration": issuer.discovery(),
                             "/openid/v1/jwks": issuer.jwks()}
                if issuer.down or self.path not in documents:
                    self.send_response(503 if issuer.down else 404)
                    self.end_headers()
                    return
                body = json.dumps(documents[self.path]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ServiceAccountIssuer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": f"{self.issuer}/openid/v1/jwks",
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": sorted(self.keys),
        }

    def jwks(self) -> dict[str, Any]:
        return {"keys": [{**key.as_dict(private=False), "kid": self.kids[alg], "alg": alg, "use": "sig"}
                         for alg, key in self.keys.items()]}

    def rotate(self, alg: str = "RS256") -> None:
        self.keys[alg] = _keys()[alg]
        self.kids[alg] = kube_key_id(self.keys[alg])

    def token(self, namespace: str, name: str, audience: list[str], *, alg: str = "RS256",
              expiration_seconds: int = 3600, pod: str | None = "api-7d9f8-abcde", now: float | None = None,
              **overrides: Any) -> str:
        """A projected service-account token, as the kubelet gets it from the TokenRequest API."""
        issued = int(time.time() if now is None else now)
        kube: dict[str, Any] = {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": str(uuid.uuid4())},
        }
        if pod is not None:  # bound to the pod (and, since 1.30, the node it runs on)
            kube["pod"] = {"name": pod, "uid": str(uuid.uuid4())}
            kube["node"] = {"name": "node-1", "uid": str(uuid.uuid4())}
        claims = {
            "aud": audience,
            "exp": issued + expiration_seconds,
            "iat": issued,
            "iss": self.issuer,
            "jti": str(uuid.uuid4()),
            "kubernetes.io": kube,
            "nbf": issued,
            "sub": f"system:serviceaccount:{namespace}:{name}",
            **overrides,
        }
        return jwt.encode({"alg": alg, "kid": self.kids[alg]}, claims, self.keys[alg], algorithms=[alg])


class SpiffeIssuer:
    """A SPIFFE trust domain's JWT authority: JWT-SVIDs, and the trust bundle written to a file."""

    def __init__(self, trust_domain: str = "example.org") -> None:
        self.trust_domain = trust_domain
        self.keys = _keys()
        self.kids = {alg: uuid.uuid4().hex for alg in self.keys}

    def bundle(self) -> dict[str, Any]:
        keys = [{**key.as_dict(private=False), "kid": self.kids[alg], "use": "jwt-svid"}
                for alg, key in self.keys.items()]
        x509_authority = {**_keys()["ES256"].as_dict(private=False), "use": "x509-svid"}  # never signs a JWT
        return {"spiffe_sequence": 1, "spiffe_refresh_hint": 300, "keys": [*keys, x509_authority]}

    def write_bundle(self, path: Path) -> Path:
        path.write_text(json.dumps(self.bundle()))
        return path

    def svid(self, path: str, audience: list[str], *, alg: str = "ES256", ttl: int = 300) -> str:
        now = int(time.time())
        claims = {"sub": f"spiffe://{self.trust_domain}{path}", "aud": audience, "exp": now + ttl, "iat": now}
        return jwt.encode({"alg": alg, "kid": self.kids[alg], "typ": "JWT"}, claims, self.keys[alg], algorithms=[alg])
