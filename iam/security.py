"""Small security primitives used across roles."""

import asyncio
import hmac
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from argon2 import PasswordHasher
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

# The one set of argon2id parameters, for passwords and hashed client secrets: t=3 passes over m=64 MiB, the cost of
# RFC 9106 §4's second recommended option, in one lane (p=1, as in every configuration OWASP's Password Storage Cheat
# Sheet lists). Lanes split the same work across threads, so they do not change what a guess costs an attacker;
# they only spend it at once on several cores: libargon2 starts and joins a thread per lane in every slice of every
# pass. Beside the token paths, four lanes per run doubled the introspection p99 during a burst of sign-ins for the
# same sign-ins per second (bench/signin.py, burst). A hash of other parameters (p=4, say) still verifies, and is
# rehashed with these at the next sign-in (iam/authn/credentials.py).
HASHER = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=1)

# An argon2id run at these parameters takes a CPU core for a fifth of a second or so. Every run in the process
# (password hashes and checks, hashed client secrets) goes through these two threads: at most two at once bounds
# memory (128 MiB) and CPU, and the threads run at a lower CPU priority (nice +10; on Linux a thread's own,
# inherited by the lane threads of a hash with more lanes), so on a busy machine a burst of sign-ins yields to the
# event loop and the token paths beside it keep more of their latency.
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
