"""Verification keys of other parties (RFC 7517 JWK Sets): which keys fit which algorithm, and key sets that
are fetched (a `jwks_uri`, or the one OpenID Connect discovery names) or read from a file (a mounted
ConfigMap), cached, and refreshed when a token names a `kid` the cache does not hold, at most once per
REFETCH_INTERVAL so that a flood of forged kids cannot make iam hammer the other party.

A shared leaf: the token role verifies client assertions with it, the authentication role upstream ID tokens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, OKPKey, RSAKey, import_key

log = logging.getLogger("iam.jwks")

Key = RSAKey | ECKey | OKPKey

# Asymmetric signature algorithms and the key type each needs. Never `none`, never HMAC: an HMAC check keyed
# with someone's public key would accept tokens anyone can forge.
SIGNING_ALGS: dict[str, type[Key]] = {
    **dict.fromkeys(("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"), RSAKey),
    **dict.fromkeys(("ES256", "ES384", "ES512"), ECKey),
    **dict.fromkeys(("EdDSA", "Ed25519"), OKPKey),
}
_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")
# RFC 7517 §4.2 `use`; SPIFFE trust bundles mark the keys of JWT-SVIDs `jwt-svid` (SPIFFE Trust Domain and
# Bundle §4.2.2) and those of X.509-SVIDs `x509-svid`, which never sign a JWT.
_SIGNATURE_USES = (None, "sig", "jwt-svid")

KEYS_TTL = 3600.0  # seconds a fetched key set is used before it is fetched again
REFETCH_INTERVAL = 60.0  # an unknown kid fetches the key set again at most this often
FETCH_TIMEOUT = 5.0  # seconds for one fetch (discovery, JWKS)
RETRY_AFTER_FAILURE = 5.0  # with no keys yet, a failed fetch is not tried again for this long: callers fail fast
MAX_DOCUMENT_BYTES = 1 << 20
LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class KeysUnavailable(Exception):
    """The key set could not be had (unreachable, an error status, not a JWK Set): not the caller's fault."""


def fits(key: Key, alg: str) -> bool:
    """RFC 7517 §4.4: a key that names its alg is used with that alg only; the key type must fit the alg."""
    needed = SIGNING_ALGS.get(alg)
    if needed is None or not isinstance(key, needed):
        return False
    declared = key.get("alg")
    if declared is not None and declared != alg:
        return False
    if isinstance(key, ECKey):
        return _CURVES[alg] == key.curve_name
    if isinstance(key, OKPKey):
        return key.curve_name == "Ed25519" if alg == "Ed25519" else key.curve_name in ("Ed25519", "Ed448")
    return True


def pick(keys: Iterable[Key], kid: Any, alg: str) -> Key | None:
    """The key for this kid and alg; without a kid, only an unambiguous one."""
    candidates = [key for key in keys if fits(key, alg)]
    if kid is not None:
        return next((key for key in candidates if key.kid == kid), None)
    return candidates[0] if len(candidates) == 1 else None


def public_keys(entries: Any) -> list[Key]:
    """The signature keys of a JWK Set's `keys`, public members only. Entries for encryption or X.509-SVIDs,
    symmetric keys and keys iam cannot read are skipped: the others still work."""
    keys: list[Key] = []
    for entry in entries if isinstance(entries, list) else ():
        if not isinstance(entry, dict) or entry.get("use") not in _SIGNATURE_USES or entry.get("kty") == "oct":
            continue
        public = {k: v for k, v in entry.items() if k not in _PRIVATE_MEMBERS and k != "use"}
        try:
            key = import_key(public)
        except (JoseError, ValueError, TypeError, KeyError):
            continue
        if isinstance(key, RSAKey | ECKey | OKPKey):
            keys.append(key)
    return keys


def check_key_set(document: Any) -> list[Key]:
    """A configured JWK Set (RFC 7591 `jwks`: `{"keys": [...]}`) of public signature keys; ValueError if not."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list) or not document["keys"]:
        raise ValueError('must be a JWK Set: {"keys": [...]} with at least one key')
    for entry in document["keys"]:
        if not isinstance(entry, dict):
            raise ValueError("every key of a JWK Set is a JSON object")
        if entry.get("kty") == "oct" or any(member in entry for member in _PRIVATE_MEMBERS):
            raise ValueError("a JWK Set here holds public keys only (no private or symmetric key)")
    keys = public_keys(document["keys"])
    if len(keys) != len(document["keys"]):
        raise ValueError("a key of the JWK Set is not a usable RSA, EC or OKP signature key")
    return keys


def secure_url(url: str) -> bool:
    """https, or http on a loopback host (a test party, a sidecar)."""
    parts = urlsplit(url)
    return bool(parts.hostname) and (parts.scheme == "https" or parts.scheme == "http"
                                     and parts.hostname in LOOPBACK_HOSTS)


class CachedKeySet:
    """Keys from a loader, cached for KEYS_TTL; an unknown kid reloads them at most once per REFETCH_INTERVAL.
    A failed reload keeps the keys loaded before (logged), if there are any."""

    def __init__(self, name: str, load: Callable[[], Awaitable[list[Key]]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self._load = load
        self._clock = clock
        self._keys: list[Key] | None = None
        self._expires = 0.0
        self._last_refetch: float | None = None  # when an unknown kid last made iam load the keys again
        self._failure: tuple[float, KeysUnavailable] | None = None  # the last failed load with no keys yet
        self._lock = asyncio.Lock()

    async def key(self, kid: Any, alg: str) -> Key | None:
        """The key for this kid and alg, or None if the party does not publish one (KeysUnavailable if the
        keys cannot be had at all)."""
        keys, now = self._keys, self._clock()
        if keys is not None and now < self._expires and (found := pick(keys, kid, alg)) is not None:
            return found
        async with self._lock:
            now = self._clock()
            if self._failure is not None and now < self._failure[0]:
                raise self._failure[1]
            if self._keys is not None:
                if now < self._expires:
                    if (found := pick(self._keys, kid, alg)) is not None:  # another request just loaded it
                        return found
                    if self._last_refetch is not None and now - self._last_refetch < REFETCH_INTERVAL:
                        return None
                    self._last_refetch = now
            await self._reload(now)
            assert self._keys is not None
            return pick(self._keys, kid, alg)

    async def _reload(self, now: float) -> None:
        try:
            self._keys = await self._load()
        except KeysUnavailable as exc:
            if self._keys is None:
                self._failure = (now + RETRY_AFTER_FAILURE, exc)
                raise
            log.warning("%s; using the keys loaded before", exc)
            self._expires = now + REFETCH_INTERVAL
            return
        self._expires, self._failure = now + KEYS_TTL, None


class KeySources:
    """One cached key set per source (a JWKS URL, an issuer's discovery, a file), shared by everything that
    trusts it, and the HTTP client they are fetched with."""

    def __init__(self, http: httpx.AsyncClient | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self._http = http or httpx.AsyncClient(timeout=FETCH_TIMEOUT, follow_redirects=False)
        self._clock = clock
        self._sets: dict[tuple[str, str], CachedKeySet] = {}

    def jwks_uri(self, url: str) -> CachedKeySet:
        return self._cached("jwks_uri", url, lambda: self._fetch_jwks(url))

    def discovery(self, issuer: str) -> CachedKeySet:
        """The keys of an OpenID Connect issuer (kube-apiserver's ServiceAccountIssuerDiscovery too):
        `{issuer}/.well-known/openid-configuration` names the jwks_uri (OpenID Connect Discovery 1.0 §4)."""
        return self._cached("discovery", issuer, lambda: self._discover(issuer))

    def file(self, path: Path) -> CachedKeySet:
        return self._cached("file", str(path), lambda: asyncio.to_thread(_read_file, path))

    def _cached(self, kind: str, where: str, load: Callable[[], Awaitable[list[Key]]]) -> CachedKeySet:
        found = self._sets.get((kind, where))
        if found is None:
            found = self._sets[kind, where] = CachedKeySet(f"{kind} {where}", load, self._clock)
        return found

    async def _discover(self, issuer: str) -> list[Key]:
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = await self._get_json("discovery", url)
        if document.get("issuer") not in (issuer, issuer.rstrip("/")):  # §4.3
            raise KeysUnavailable(f"discovery of {issuer}: its issuer is another")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not secure_url(jwks_uri):
            raise KeysUnavailable(f"discovery of {issuer}: jwks_uri is missing or not an https URL")
        return await self._fetch_jwks(jwks_uri)

    async def _fetch_jwks(self, url: str) -> list[Key]:
        document = await self._get_json("JWKS", url)
        if not isinstance(document.get("keys"), list):
            raise KeysUnavailable(f"JWKS {url}: not a JWK Set")
        return public_keys(document["keys"])

    async def _get_json(self, what: str, url: str) -> dict[str, Any]:
        """One GET, bounded by FETCH_TIMEOUT and MAX_DOCUMENT_BYTES; a JSON object or KeysUnavailable."""
        if not secure_url(url):
            raise KeysUnavailable(f"{what} {url}: not an https URL")
        try:
            async with asyncio.timeout(FETCH_TIMEOUT), self._http.stream(
                    "GET", url, headers={"Accept": "application/json"}) as response:
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT_BYTES:
                        raise KeysUnavailable(f"{what} {url}: answered more than 1 MiB")
        except (TimeoutError, httpx.TimeoutException):
            raise KeysUnavailable(f"{what} {url}: no answer within {FETCH_TIMEOUT:g} s") from None
        except httpx.HTTPError as exc:
            raise KeysUnavailable(f"{what} {url}: unreachable ({type(exc).__name__})") from None
        document = json_object(bytes(body))
        if response.status_code != 200 or document is None:
            raise KeysUnavailable(f"{what} {url}: answered {response.status_code}, not a JSON object")
        return document

    async def close(self) -> None:
        await self._http.aclose()


def _read_file(path: Path) -> list[Key]:
    try:
        document = json_object(path.read_bytes())
    except OSError as exc:
        raise KeysUnavailable(f"JWKS file {path}: cannot be read ({exc.strerror})") from None
    if document is None or not isinstance(document.get("keys"), list):
        raise KeysUnavailable(f"JWKS file {path}: not a JWK Set")
    return public_keys(document["keys"])


def json_object(body: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return document if isinstance(document, dict) else None
