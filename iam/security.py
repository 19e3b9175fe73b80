"""Small security primitives used across roles."""

import asyncio
import base64
import binascii
import hmac
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from argon2 import PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerifyMismatchError
from argon2.low_level import core, error_to_str, ffi, lib
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from iam.cpu import cpu_limit, cpus_allowed, hashing_plan


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
# RFC 9106 §4's second recommended option, in one lane (p=1, as in every configuration OWASP's Password Storage
# Cheat Sheet lists). Lanes split the same work across threads, so they do not change what a guess costs an
# attacker; they only spend it at once on several cores: libargon2 starts and joins a thread per lane in every slice
# of every pass. Beside the token paths, four lanes per run doubled the introspection p99 during a burst of sign-ins
# for the same sign-ins per second (bench/signin.py, burst). A hash of other parameters (p=4, say) still verifies,
# and a password's is rehashed with these at the next sign-in (iam/authn/credentials.py).
HASHER = PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=1)


def hash_secret(secret: str) -> str:
    """An encoded argon2id hash of `secret` at iam's parameters (`HASHER`)."""
    return HASHER.hash(secret)


def needs_rehash(encoded: str) -> bool:
    return HASHER.check_needs_rehash(encoded)


def verify_hash(encoded: str, secret: str) -> None:
    """Check `secret` against an encoded argon2 hash, or raise VerifyMismatchError (InvalidHashError if malformed).

    What `PasswordHasher.verify` does, but always on the calling thread, whatever lanes the hash has: libargon2's
    own verify runs a thread per lane, so a hash of several lanes would be answered sooner than one of one lane,
    and the wall time would tell an account with an older hash from an unknown name (which verifies a dummy hash
    at iam's parameters). On one thread the time is the work, the same for both. The lanes are part of the hash;
    how many threads compute them is not, so the answer is the same."""
    used = extract_parameters(encoded)  # the type, version and costs; InvalidHashError if they are not there
    parts = encoded.split("$")
    version = used.version if len(parts) == 6 else 0x10  # a hash of Argon2 1.0 names no version
    try:
        salt, expected = (base64.b64decode(part + "=" * (-len(part) % 4), validate=True) for part in parts[-2:])
    except (binascii.Error, ValueError):
        raise InvalidHashError from None
    password = secret.encode()
    # Each buffer is held by a name until core() returns: the context only points at them, and a buffer nothing
    # holds would be freed at once, leaving libargon2 to read whatever takes its place.
    out, pwd, salt_buffer = (ffi.new("uint8_t[]", len(expected)), ffi.new("uint8_t[]", password),
                             ffi.new("uint8_t[]", salt))
    context = ffi.new("argon2_context *", {
        "out": out, "outlen": len(expected), "pwd": pwd, "pwdlen": len(password),
        "salt": salt_buffer, "saltlen": len(salt), "secret": ffi.NULL, "secretlen": 0,
        "ad": ffi.NULL, "adlen": 0, "t_cost": used.time_cost, "m_cost": used.memory_cost,
        "lanes": used.parallelism, "threads": 1, "version": version, "allocate_cbk": ffi.NULL,
        "free_cbk": ffi.NULL, "flags": lib.ARGON2_DEFAULT_FLAGS})
    failed = core(context, used.type.value)
    if failed:  # a parameter libargon2 refuses (a salt too short, a cost out of range): not a hash it made
        raise InvalidHashError(error_to_str(failed))
    if not hmac.compare_digest(bytes(out), expected):
        raise VerifyMismatchError


# An argon2id run at these parameters takes a CPU core for a fifth of a second or so. Every run in the process
# (password hashes and checks, hashed client secrets) goes through these threads: at most two at once bounds memory
# (128 MiB) and CPU, and they run at a lower CPU priority (nice +10, on Linux a thread's own), so on a busy machine
# a burst of sign-ins yields to the event loop and the token paths beside it keep more of their latency. How many,
# and whether they share the event loop's one CPU, follows the CPU limit of the process's container (iam/cpu.py).
HASHING = hashing_plan(cpu_limit(), cpus_allowed())
_LOWER_PRIORITY = 10


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _LOWER_PRIORITY)
    except (AttributeError, OSError):  # not Linux, or not allowed: the same threads at the normal priority
        pass


_slow_hashes = ThreadPoolExecutor(HASHING.threads, thread_name_prefix="iam-argon2", initializer=_lower_priority)


async def slow_hash(fn: Callable[..., _T], *args: object) -> _T:
    """Run an argon2 call off the event loop on the process's low-priority hashing threads."""
    return await asyncio.get_running_loop().run_in_executor(_slow_hashes, fn, *args)
