"""Small security primitives used across roles."""

import hmac
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _key(secret: str, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(secret.encode())


def seal(secret: str, purpose: bytes, data: bytes) -> bytes:
    """Encrypt `data` so that only a holder of `secret` can read it back (AES-256-GCM, key by HKDF)."""
    nonce = os.urandom(12)
    return nonce + AESGCM(_key(secret, purpose)).encrypt(nonce, data, purpose)


def unseal(secret: str, purpose: bytes, blob: bytes) -> bytes:
    return AESGCM(_key(secret, purpose)).decrypt(blob[:12], blob[12:], purpose)
