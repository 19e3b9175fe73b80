"""Authorization server metadata (RFC 8414, OpenID Connect Discovery 1.0), built once per key ring: it describes
exactly what this server implements; with the JWKS, the documents iam/token/discovery.py serves."""

from __future__ import annotations

import json
from typing import Any

from iam.config import MTLS_METHODS, Settings
from iam.formats import ACR_VALUES, PROMPTS
from iam.http import StaticDocument
from iam.keys import KeyRing
from iam.token.claims import CLAIMS_SUPPORTED
from iam.token.client_assertions import ASSERTION_ALGS
from iam.token.dpop import DPOP_ALGS

# On the wire a workload_identity client sends a jwt-bearer client assertion too (RFC 7523 §2.2): the methods a
# client can name are these; workload_identity only says whose keys verify its assertion.
CONFIDENTIAL_METHODS = ["client_secret_basic", "client_secret_post", "private_key_jwt", *MTLS_METHODS]
# RFC 8705 §5: the endpoints a client authenticates at or presents a certificate-bound token to.
MTLS_ALIASED = {"token_endpoint": "/oauth/v2/token", "revocation_endpoint": "/oauth/v2/revoke",
                "introspection_endpoint": "/oauth/v2/introspect", "userinfo_endpoint": "/oauth/v2/userinfo",
                "device_authorization_endpoint": "/oauth/v2/device_authorization",
                "pushed_authorization_request_endpoint": "/oauth/v2/par"}
CACHE_CONTROL = "public, max-age=300"


def metadata(settings: Settings, grant_types: list[str], keys: KeyRing) -> dict[str, Any]:
    base = settings.issuer.rstrip("/")
    scopes = sorted({scope for client in settings.clients for scope in client.scopes} | {"openid"})
    document = _document(settings, grant_types, keys, base, scopes)
    if settings.mtls.endpoint_base is not None:
        mtls_base = settings.mtls.endpoint_base.rstrip("/")
        document["mtls_endpoint_aliases"] = {name: mtls_base + path for name, path in MTLS_ALIASED.items()}
    if settings.registration.enabled:  # RFC 8414 §2, RFC 7591 §3
        document["registration_endpoint"] = f"{base}/oauth/v2/register"
    return document


def _document(settings: Settings, grant_types: list[str], keys: KeyRing, base: str,
              scopes: list[str]) -> dict[str, Any]:
    return {
        "issuer": settings.issuer,
        "authorization_endpoint": f"{base}/oauth/v2/authorize",
        "token_endpoint": f"{base}/oauth/v2/token",
        "userinfo_endpoint": f"{base}/oauth/v2/userinfo",
        "jwks_uri": f"{base}/oauth/v2/jwks",
        "introspection_endpoint": f"{base}/oauth/v2/introspect",
        "revocation_endpoint": f"{base}/oauth/v2/revoke",
        "end_session_endpoint": f"{base}/oauth/v2/end_session",
        "backchannel_logout_supported": True,  # Back-Channel Logout 1.0 §2.1
        "backchannel_logout_session_supported": True,  # every logout token of a session carries its sid
        "device_authorization_endpoint": f"{base}/oauth/v2/device_authorization",
        "pushed_authorization_request_endpoint": f"{base}/oauth/v2/par",  # RFC 9126 §5
        "require_pushed_authorization_requests": False,
        "grant_types_supported": grant_types,
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "scopes_supported": scopes,
        "claims_supported": CLAIMS_SUPPORTED,
        "acr_values_supported": list(ACR_VALUES),
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "code_challenge_methods_supported": ["S256"],
        "prompt_values_supported": sorted(PROMPTS),
        "token_endpoint_auth_methods_supported": [*CONFIDENTIAL_METHODS, "none"],
        "token_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
        "introspection_endpoint_auth_methods_supported": CONFIDENTIAL_METHODS,
        "introspection_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
        "revocation_endpoint_auth_methods_supported": [*CONFIDENTIAL_METHODS, "none"],
        "revocation_endpoint_auth_signing_alg_values_supported": list(ASSERTION_ALGS),
        "introspection_signing_alg_values_supported": keys.jws_algorithms,  # RFC 9701 §7
        "authorization_response_iss_parameter_supported": True,  # RFC 9207
        "claims_parameter_supported": False,  # OIDC Core §5.5: the claims parameter is ignored
        "request_parameter_supported": False,
        "request_uri_parameter_supported": False,
        "dpop_signing_alg_values_supported": list(DPOP_ALGS),  # RFC 9449 §5.1
        "tls_client_certificate_bound_access_tokens": True,  # RFC 8705 §3.3
    }


class Documents:
    """The metadata and the JWKS of the current key ring (see iam/token/discovery.py), rebuilt the first time they
    are asked for after the ring changed (`KeyRing.generation`: a rotation picked up)."""

    def __init__(self, settings: Settings, grant_types: list[str], keys: KeyRing) -> None:
        self._settings, self._grant_types, self._keys = settings, grant_types, keys
        self._generation = -1
        self.metadata = self.jwks = StaticDocument(b"", "application/json", CACHE_CONTROL)

    def current(self) -> Documents:
        keys = self._keys
        if self._generation != keys.generation:
            body = json.dumps(metadata(self._settings, self._grant_types, keys), separators=(",", ":")).encode()
            self.metadata = StaticDocument(body, "application/json", CACHE_CONTROL)
            self.jwks = StaticDocument(keys.jwks_json, "application/jwk-set+json", CACHE_CONTROL)
            self._generation = keys.generation
        return self
