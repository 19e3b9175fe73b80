"""DPoP proofs (RFC 9449): a client proves, request by request, that it holds the key its tokens are bound to.

A proof is a JWT signed with the client's key, the public key in its header (§4.2). It names one HTTP request
(`htm`, `htu`), is fresh (`iat`), single use (`jti`), and at a protected resource carries the hash of the
access token it goes with (`ath`). The key's JWK thumbprint (RFC 7638), `jkt`, is what a token is bound to
(`cnf.jkt`, §6).

Single use holds across replicas: a proof's jti is recorded in the token store (the `assertion_jtis` table that
client assertions use: the same rule, a jti seen before is a replay, kept until the proof could no longer be
accepted; DPoP entries are keyed under their own prefix and the key's thumbprint, so they never meet an
assertion's), purged with it.

Server nonces (§8) are stateless: HMAC over a time window with a key derived from the key ring's data key, so
every replica that shares the key ring issues and accepts the same ones; the current and the previous window
are accepted, so a nonce lives between one and two `nonce_lifetime`s and rotates by itself. Without a data key
the nonce key is random per process: a nonce from another replica is then refused with a fresh one
(`use_dpop_nonce`), and the client's retry succeeds wherever it lands only if it lands on the same replica.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry
from joserfc.jws import JWSRegistry, extract_compact

from iam.config import DPoP
from iam.errors import OAuthError, description_text
from iam.token.store import TokenStore

# Asymmetric only: never none, never HMAC (§4.2). Ed25519 is EdDSA by its RFC 9864 name.
DPOP_ALGS = ("ES256", "RS256", "PS256", "EdDSA", "Ed25519")
PROOF_TYPE = "dpop+jwt"
CLOCK_SKEW = 30  # seconds a proof's iat may be ahead of this server's clock
MAX_JTI_CHARS = 256
MAX_PROOF_CHARS = 8192
JKT_SHAPE = re.compile(r"^[A-Za-z0-9_-]{43}$")  # a SHA-256 JWK thumbprint, base64url
# JWK members that only a private (or symmetric) key has (RFC 7518 §6.2.2, §6.3.2, §6.4; RFC 8037 §2).
PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
# joserfc's default header limit (512 bytes) is below an RSA key's jwk header; an RSA-4096 one fits in this.
_REGISTRY = JWSRegistry(algorithms=DPOP_ALGS)
_REGISTRY.max_header_length = 2048
_NONCE_PURPOSE = b"iam dpop nonce v1"
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_DEFAULT_PORTS = {"http": 80, "https": 443}


class InvalidProof(Exception):
    """The proof does not hold (the message says which rule): `invalid_dpop_proof` (RFC 9449 §5.2, §7.1)."""

    error = "invalid_dpop_proof"


class NonceRequired(InvalidProof):
    """The proof lacks a current server nonce: `use_dpop_nonce` with a fresh one in `DPoP-Nonce` (§8, §9)."""

    error = "use_dpop_nonce"


@dataclass(frozen=True, slots=True)
class Proof:
    jkt: str  # the JWK thumbprint of the proof's key (RFC 7638, SHA-256)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def access_token_hash(token: str) -> str:
    """`ath` (§4.2): base64url of the SHA-256 of the access token's ASCII."""
    return b64(hashlib.sha256(token.encode()).digest())


def normalised_htu(url: str) -> str:
    """The URL a proof is compared on (§4.3): no query or fragment, after syntax- and scheme-based normalisation
    (RFC 3986 §6.2.2, §6.2.3): lowercase scheme and host, no default port, `/` for an empty path, percent-encoding
    in uppercase and unreserved characters decoded."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    netloc = host if port is None or port == _DEFAULT_PORTS.get(scheme) else f"{host}:{port}"
    path = _PERCENT.sub(_normal_escape, parts.path) or "/"
    return urlunsplit((scheme, netloc, path, "", ""))


def _normal_escape(match: re.Match[str]) -> str:
    char = chr(int(match.group(0)[1:], 16))
    return char if char in _UNRESERVED else match.group(0).upper()


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256), base64url."""
    return str(JWKRegistry.import_key(jwk).thumbprint())


class Nonces:
    """Server nonces (§8): HMAC over the time window, current and previous accepted."""

    def __init__(self, settings: DPoP, secret: str | None, clock: Callable[[], float] = time.time) -> None:
        self.lifetime = settings.nonce_lifetime
        material = secret.encode() if secret else secrets.token_bytes(32)
        self._key = hmac.new(material, _NONCE_PURPOSE, hashlib.sha256).digest()
        self.clock = clock

    def for_window(self, window: int) -> str:
        return b64(hmac.new(self._key, window.to_bytes(8, "big"), hashlib.sha256).digest())

    def current(self) -> str:
        return self.for_window(int(self.clock()) // self.lifetime)

    def accepts(self, nonce: Any) -> bool:
        if not isinstance(nonce, str):
            return False
        window = int(self.clock()) // self.lifetime
        # Both compared, constant time: which window matched says nothing.
        current = hmac.compare_digest(nonce.encode(), self.for_window(window).encode())
        previous = hmac.compare_digest(nonce.encode(), self.for_window(window - 1).encode())
        return current or previous


def token_endpoint_error(exc: InvalidProof, nonces: Nonces) -> OAuthError:
    """At the token endpoint (RFC 9449 §5.2, §8): 400 with the error; a fresh nonce with use_dpop_nonce."""
    headers = {"DPoP-Nonce": nonces.current()} if isinstance(exc, NonceRequired) else None
    return OAuthError(exc.error, str(exc), 400, headers)


def resource_error(description: str, nonces: Nonces, error: str = "invalid_dpop_proof",
                   nonce: bool = False) -> OAuthError:
    """At a protected resource (RFC 9449 §7.1, §9): 401 with a DPoP challenge naming the error and the algs."""
    challenge = (f'DPoP error="{error}", error_description="{description_text(description)}", '
                 f'algs="{" ".join(DPOP_ALGS)}"')
    headers = {"WWW-Authenticate": challenge}
    if nonce:
        headers["DPoP-Nonce"] = nonces.current()
    return OAuthError(error, description, 401, headers)


class ProofVerifier:
    """Checks DPoP proofs (§4.3) for the token endpoint, forward-auth and userinfo."""

    def __init__(self, settings: DPoP, store: TokenStore, nonces: Nonces,
                 clock: Callable[[], float] = time.time) -> None:
        self.max_age = settings.proof_max_age
        self.require_nonce = settings.require_nonce
        self.store = store
        self.nonces = nonces
        self.clock = clock

    def error(self, exc: InvalidProof, *, resource: bool) -> OAuthError:
        if resource:
            return resource_error(str(exc), self.nonces, exc.error, isinstance(exc, NonceRequired))
        return token_endpoint_error(exc, self.nonces)

    async def check_presented(self, scheme: str, token: str, bound: str | None, proofs: list[str],
                              method: str | None, url: str | None) -> None:
        """At a protected resource (§7.1): a token bound to a key needs the DPoP scheme and a proof of that key
        for this request (`method`, `url`; None if not known) and this token; the DPoP scheme needs a bound
        token. OAuthError (401) otherwise."""
        if bound is None:
            if scheme == "dpop":
                raise resource_error("the access token is not bound to a DPoP key", self.nonces, "invalid_token")
            return
        if scheme != "dpop":
            raise resource_error("a DPoP-bound access token must be sent with the DPoP scheme", self.nonces,
                                 "invalid_token")
        if len(proofs) != 1:
            raise resource_error("exactly one DPoP proof is required with a DPoP-bound access token", self.nonces)
        if not method or not url:
            raise resource_error("the ingress forwarded no original method and URL to check the DPoP proof against",
                                 self.nonces)
        try:
            proof = await self.verify(proofs[0], method, url, access_token=token)
        except InvalidProof as exc:
            raise self.error(exc, resource=True) from None
        if not hmac.compare_digest(proof.jkt.encode(), bound.encode()):
            raise resource_error("the DPoP proof is signed by another key than the token is bound to", self.nonces)

    async def verify(self, proof: str, method: str, url: str, *, access_token: str | None = None) -> Proof:
        """The proof's key thumbprint if `proof` is a valid, unused proof for `method` `url` (with `access_token`,
        at a protected resource); InvalidProof (or NonceRequired) otherwise. Records its jti."""
        header, claims, jwk = _verified(proof)
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI_CHARS:
            raise InvalidProof("the DPoP proof has no usable jti")
        if claims.get("htm") != method:
            raise InvalidProof("the DPoP proof's htm is not this request's method")
        htu = claims.get("htu")
        if not isinstance(htu, str) or normalised_htu(htu) != normalised_htu(url):
            raise InvalidProof("the DPoP proof's htu is not this request's URL")
        iat = claims.get("iat")
        now = self.clock()
        if not isinstance(iat, int | float) or isinstance(iat, bool):
            raise InvalidProof("the DPoP proof has no iat")
        if iat > now + CLOCK_SKEW or iat < now - self.max_age:
            raise InvalidProof("the DPoP proof's iat is outside the accepted window")
        if access_token is not None and not hmac.compare_digest(
            str(claims.get("ath", "")).encode(), access_token_hash(access_token).encode()
        ):
            raise InvalidProof("the DPoP proof's ath is not the hash of the access token")
        if self.require_nonce and not self.nonces.accepts(claims.get("nonce")):
            raise NonceRequired("a current DPoP-Nonce is required in the proof")
        jkt = thumbprint(jwk)
        # §11.1: single use, on every replica, for as long as its iat could be accepted.
        digest = hashlib.sha256(f"dpop\0{jkt}\0{jti}".encode()).digest()
        if not await self.store.use_assertion_jti(digest, "dpop:" + jkt, int(iat) + self.max_age + 1):
            raise InvalidProof("the DPoP proof was used before (jti)")
        return Proof(jkt)


def _verified(proof: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Header, claims and public JWK of a proof whose signature verifies with the key in its own header."""
    if len(proof) > MAX_PROOF_CHARS:
        raise InvalidProof("the DPoP proof is too large")
    try:
        header = extract_compact(proof.encode(), registry=_REGISTRY).headers()
    except (JoseError, ValueError, UnicodeError):
        raise InvalidProof("the DPoP proof is not a compact JWS") from None
    if header.get("typ") != PROOF_TYPE:
        raise InvalidProof("the DPoP proof's typ is not dpop+jwt")
    alg = header.get("alg")
    if alg not in DPOP_ALGS:
        raise InvalidProof("the DPoP proof's alg is not one of " + " ".join(DPOP_ALGS))
    if "crit" in header:  # RFC 7515 §4.1.11: no extension iam would have to understand
        raise InvalidProof("unsupported crit header")
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise InvalidProof("the DPoP proof has no jwk header")
    if PRIVATE_MEMBERS & jwk.keys():
        raise InvalidProof("the DPoP proof's jwk must be a public key")
    try:
        key = JWKRegistry.import_key(jwk)
        payload = jws.deserialize_compact(proof, key, algorithms=[alg], registry=_REGISTRY).payload
        claims = json.loads(payload)
    except (JoseError, ValueError, TypeError, UnicodeError):
        raise InvalidProof("the DPoP proof's signature does not verify with its jwk") from None
    if not isinstance(claims, dict):
        raise InvalidProof("the DPoP proof's claims are not a JSON object")
    return header, claims, jwk
