"""The signing key ring: private JWKs in a directory, one file per key, JWKS published from memory.

In production the directory is a mounted Kubernetes Secret; the embedded default generates keys on first
run with 0600 permissions. A key's `kid` starts with its creation time, so the ring needs no other state:
for each algorithm the newest key that is past the activation delay signs, and every key in the directory
is published, so tokens signed by an older key stay verifiable until the operator removes it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from joserfc.jwk import ECKey, KeyParameters, KeySet, OKPKey, RSAKey

log = logging.getLogger("iam.keys")

# The kinds of key in the ring, one signing key each. RS256: what kube-apiserver accepts by default; ES256: fast
# to sign; Ed25519: faster still (RFC 8037), for the signed introspection responses a client may ask for.
ALGORITHMS = ("RS256", "ES256", "Ed25519")
# JWS `alg` names and the kind of key that signs them: `EdDSA` (RFC 8037 §3.1) is the polymorphic name RFC 9864
# deprecates for the fully specified `Ed25519`; one key serves both, so its published JWK names no `alg`.
JWS_KEY = {"RS256": "RS256", "ES256": "ES256", "EdDSA": "Ed25519", "Ed25519": "Ed25519"}
_KID_TIME = "%Y%m%dT%H%M%S%fZ"  # microseconds: two rotations in one second still order


class KeyRingError(Exception):
    """The key directory cannot give a usable ring (the message says why)."""


Key = RSAKey | ECKey | OKPKey


@dataclass(frozen=True)
class SigningKey:
    kid: str
    alg: str
    created: datetime
    key: Key

    def public_jwk(self) -> dict[str, Any]:
        public = self.key.as_dict(private=False)
        if self.alg == "Ed25519":
            public.pop("alg", None)  # verifiable as `EdDSA` and as `Ed25519` (see JWS_KEY)
        return public


def _new_key(alg: str, now: datetime) -> Key:
    kid = f"{now.strftime(_KID_TIME)}-{alg.lower()}-{secrets.token_hex(4)}"
    parameters: KeyParameters = {"kid": kid, "alg": alg, "use": "sig"}
    if alg == "RS256":
        return RSAKey.generate_key(2048, parameters=parameters, private=True)
    if alg == "Ed25519":
        return OKPKey.generate_key("Ed25519", parameters=parameters, private=True)
    return ECKey.generate_key("P-256", parameters=parameters, private=True)


def _import_key(alg: str, data: dict[str, Any]) -> Key:
    if alg == "RS256":
        return RSAKey.import_key(data)
    if alg == "Ed25519":
        return OKPKey.import_key(data)
    return ECKey.import_key(data)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _signature(key: SigningKey, message: bytes) -> bytes:
    """The JWS signature of `message` (RFC 7518 §3.3, §3.4; RFC 8037 §3.1), straight from `cryptography`."""
    private: Any = key.key.private_key
    if key.alg == "RS256":
        return bytes(private.sign(message, padding.PKCS1v15(), hashes.SHA256()))
    if key.alg == "ES256":  # JWS wants r || s, 32 bytes each, not DER
        r, s = decode_dss_signature(private.sign(message, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return bytes(private.sign(message))


def _write_private(path: Path, data: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle)


DATA_KEY = "data.key"  # beside the signing keys: the secret that seals data at rest (TOTP secrets)


class KeyRing:
    def __init__(self, directory: Path, activation_delay: int = 0) -> None:
        self.directory = directory
        self.activation_delay = activation_delay
        self._keys: list[SigningKey] = []
        self._signing: dict[str, SigningKey] = {}
        self._headers: dict[tuple[str, str], tuple[bytes, SigningKey]] = {}  # (alg, typ): encoded header, key
        self.generation = 0  # counts the installs: documents built from the ring compare it to rebuild
        self._fingerprint: tuple[tuple[str, int], ...] = ()
        self.jwks_json: bytes = b'{"keys":[]}'
        self.public_set = KeySet([])

    # -- loading ----------------------------------------------------------------------------------------
    def load(self, generate: bool = False) -> KeyRing:
        """Read the directory; with `generate`, create a missing directory and any missing algorithm's key."""
        if generate:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not self.directory.is_dir():
            raise KeyRingError(f"key directory {self.directory} does not exist (run `iam keys rotate` to create it)")
        keys = self._read()
        if generate:
            now = datetime.now(UTC)
            for alg in ALGORITHMS:
                if not any(k.alg == alg for k in keys):
                    self._store(_new_key(alg, now))
                    log.info("generated %s signing key in %s", alg, self.directory)
            keys = self._read()
        self._install(keys)
        return self

    def reload_if_changed(self) -> bool:
        """Pick up keys added or removed by a rotation (a Secret update, another replica's CLI)."""
        if self._listing() == self._fingerprint:
            return False
        self._install(self._read())
        log.info("key ring reloaded: %s", ", ".join(k.kid for k in self._keys))
        return True

    def _listing(self) -> tuple[tuple[str, int], ...]:
        try:
            return tuple(sorted((p.name, p.stat().st_mtime_ns) for p in self.directory.glob("*.json")))
        except OSError:
            return ()

    def _read(self) -> list[SigningKey]:
        keys = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                data = json.loads(path.read_text())
                alg = data["alg"]
                kid = data["kid"]
                created = datetime.strptime(kid.split("-", 1)[0], _KID_TIME).replace(tzinfo=UTC)
                key = _import_key(alg, data)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise KeyRingError(f"key file {path} is not a private JWK written by iam ({exc})") from None
            if alg not in ALGORITHMS or not key.is_private:
                raise KeyRingError(f"key file {path} must hold a private {' or '.join(ALGORITHMS)} key")
            keys.append(SigningKey(kid=kid, alg=alg, created=created, key=key))
        return keys

    def _store(self, key: Key) -> None:
        _write_private(self.directory / f"{key.kid}.json", key.as_dict(private=True))

    def _install(self, keys: list[SigningKey]) -> None:
        if not keys:
            raise KeyRingError(f"key directory {self.directory} holds no keys")
        now = datetime.now(UTC)
        signing: dict[str, SigningKey] = {}
        for alg in ALGORITHMS:
            candidates = sorted((k for k in keys if k.alg == alg), key=lambda k: k.created)
            active = [k for k in candidates if (now - k.created).total_seconds() >= self.activation_delay]
            if active or candidates:
                signing[alg] = (active or candidates[:1])[-1]
        public = [k.public_jwk() for k in sorted(keys, key=lambda k: k.created, reverse=True)]
        self._keys, self._signing, self._headers = keys, signing, {}
        self._fingerprint = self._listing()
        self.jwks_json = json.dumps({"keys": public}, separators=(",", ":")).encode()
        self.public_set = KeySet.import_key_set({"keys": public})
        self.generation += 1

    # -- use ----------------------------------------------------------------------------------------------
    @property
    def algorithms(self) -> list[str]:
        """The kinds of key that can sign now (see ALGORITHMS)."""
        return sorted(self._signing)

    @property
    def jws_algorithms(self) -> list[str]:
        """The JWS `alg` values the ring can sign with now (see JWS_KEY)."""
        return [alg for alg, kind in JWS_KEY.items() if kind in self._signing]

    def signing_key(self, alg: str) -> SigningKey:
        try:
            return self._signing[alg]
        except KeyError:
            raise KeyRingError(f"no {alg} key in {self.directory}") from None

    def sign(self, claims: dict[str, Any], *, alg: str, typ: str = "JWT") -> str:
        """A compact JWS of `claims` (RFC 7515 §7.1). The header is encoded once per key, alg and typ."""
        found = self._headers.get((alg, typ))
        if found is None:
            if alg not in JWS_KEY:
                raise KeyRingError(f"{alg} is not a signing algorithm of this ring")
            key = self.signing_key(JWS_KEY[alg])
            header = json.dumps({"alg": alg, "typ": typ, "kid": key.kid}, separators=(",", ":")).encode()
            found = self._headers[(alg, typ)] = (b64url(header).encode() + b".", key)
        header, key = found
        message = header + b64url(json.dumps(claims, separators=(",", ":")).encode()).encode()
        return f"{message.decode('ascii')}.{b64url(_signature(key, message))}"

    def public_keys(self) -> list[SigningKey]:
        return list(self._keys)

    def data_key(self, generate: bool = False) -> str | None:
        """The data key (256 random bits, base64url), created first if asked and missing; None if absent."""
        path = self.directory / DATA_KEY
        if generate and not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(32))
            log.info("generated the data key in %s", self.directory)
        try:
            value = path.read_text().strip()
        except FileNotFoundError:
            return None
        if len(value) < 43:
            raise KeyRingError(f"{path} must hold at least 256 bits (43 base64url characters)")
        return value

    # -- administration ----------------------------------------------------------------------------------
    def rotate(self) -> list[str]:
        """Add a new key for every algorithm. Old keys stay published, so their tokens stay verifiable.
        (The data key is created once, if missing: what it sealed must stay readable.)"""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.data_key(generate=True)
        now = datetime.now(UTC)
        added = []
        for alg in ALGORITHMS:
            key = _new_key(alg, now)
            self._store(key)
            assert key.kid is not None  # _new_key names every key
            added.append(key.kid)
        self._install(self._read())
        return added

    def remove(self, kid: str) -> None:
        """Stop publishing a retired key. The key that signs for its algorithm cannot be removed."""
        if any(k.kid == kid for k in self._signing.values()):
            raise KeyRingError(f"{kid} is the active signing key; rotate first")
        path = self.directory / f"{kid}.json"
        if not any(k.kid == kid for k in self._keys) or not path.exists():
            raise KeyRingError(f"no key {kid} in {self.directory}")
        path.unlink()
        self._install(self._read())
