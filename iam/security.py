"""Small security primitives used across roles."""

import asyncio
import hmac
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

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


_T = TypeVar("_T")

# argon2id at 64 MiB and four lanes takes tens of milliseconds of CPU per run. Every run in the process (password
# hashes and checks, hashed client secrets) goes through these two threads: at most two at once bounds memory
# (128 MiB) and CPU, and the threads run at a lower CPU priority (nice +10; on Linux a thread's own, inherited by
# the lanes argon2 starts), so on a busy machine a burst of sign-ins yields to the event loop and the token
# paths beside it keep their latency.
SLOW_HASH_THREADS = 2
_LOWER_PRIORITY = 10


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _LOWER_PRIORITY)
    except (AttributeError, OSError):  # not Linux, or not allowed: the same threads at the normal priority
        pass


_slow_hashes = ThreadPoolExecutor(SLOW_HASH_THREADS, thread_name_prefix="iam-argon2", initializer=_lower_priority)


async def slow_hash(fn: Callable[..., _T], *args: object) -> _T:
    """Run an argon2 call off the event loop on the process's low-priority hashing threads."""
    return await asyncio.get_running_loop().run_in_executor(_slow_hashes, fn, *args)
