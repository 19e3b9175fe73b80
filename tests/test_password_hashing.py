"""iam's argon2 verification (iam/security.py verify_hash): on one thread whatever the hash's lanes, and still the
same answer as argon2-cffi's own verify for every hash it makes; malformed hashes are refused, never a crash."""

from __future__ import annotations

import pytest
from argon2 import PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerifyMismatchError

from iam.security import hash_secret, needs_rehash, verify_hash

SECRET = "correct horse battery staple"
SMALL = {"time_cost": 1, "memory_cost": 1024}  # the rule is the same at any cost; the suite stays fast


@pytest.mark.parametrize("kind", [Type.ID, Type.I, Type.D])
@pytest.mark.parametrize("lanes", [1, 2, 4, 8])
def test_every_hash_argon2_cffi_makes_verifies_and_a_wrong_secret_does_not(kind, lanes):
    encoded = PasswordHasher(parallelism=lanes, type=kind, **SMALL).hash(SECRET)
    verify_hash(encoded, SECRET)
    for wrong in (SECRET + "x", SECRET[:-1], "", SECRET.upper()):
        with pytest.raises(VerifyMismatchError):
            verify_hash(encoded, wrong)


def test_secrets_of_every_length_verify():
    """Every length from empty to past a block: the buffers handed to libargon2 must live through the call."""
    hasher = PasswordHasher(parallelism=4, **SMALL)
    for length in range(0, 130):
        secret = "".join(chr(33 + (length * 7 + i) % 90) for i in range(length))
        verify_hash(hasher.hash(secret), secret)
    for length in (17, 20):  # once at iam's own costs and at argon2-cffi's four lanes
        for encoded in (hash_secret("s" * length), PasswordHasher().hash("s" * length)):
            verify_hash(encoded, "s" * length)


def test_other_salt_and_hash_lengths_and_a_non_ascii_secret():
    for salt_len, hash_len in ((8, 4), (16, 32), (32, 64)):
        encoded = PasswordHasher(salt_len=salt_len, hash_len=hash_len, parallelism=3, **SMALL).hash("pässwörd ✓")
        verify_hash(encoded, "pässwörd ✓")
        with pytest.raises(VerifyMismatchError):
            verify_hash(encoded, "passwort ✓")


def test_a_hash_of_argon2_1_0_verifies_with_or_without_its_version():
    from argon2.low_level import hash_secret as argon2_hash

    encoded = argon2_hash(SECRET.encode(), b"saltsalt", 1, 1024, 2, 16, Type.ID, version=0x10).decode()
    assert "$v=16$" in encoded
    for form in (encoded, encoded.replace("$v=16", "")):
        PasswordHasher().verify(form, SECRET)  # what argon2-cffi accepts, iam accepts
        verify_hash(form, SECRET)
        with pytest.raises(VerifyMismatchError):
            verify_hash(form, SECRET + "x")
    with pytest.raises(VerifyMismatchError):  # the version is part of the hash
        verify_hash(encoded.replace("v=16", "v=19"), SECRET)


def test_iams_parameters_are_one_lane_argon2id_and_older_ones_need_a_rehash():
    encoded = hash_secret(SECRET)
    used = extract_parameters(encoded)
    assert (used.type, used.time_cost, used.memory_cost, used.parallelism) == (Type.ID, 3, 64 * 1024, 1)
    verify_hash(encoded, SECRET)
    assert not needs_rehash(encoded)
    assert needs_rehash(PasswordHasher(time_cost=3, memory_cost=64 * 1024, parallelism=4).hash(SECRET))
    assert needs_rehash(PasswordHasher(**SMALL, parallelism=1).hash(SECRET))  # a cheaper one too


def test_a_changed_hash_or_salt_is_a_mismatch():
    encoded = PasswordHasher(**SMALL).hash(SECRET)
    head, salt, digest = encoded.rsplit("$", 2)
    flipped = ("A" if digest[0] != "A" else "B") + digest[1:]
    with pytest.raises(VerifyMismatchError):
        verify_hash(f"{head}${salt}${flipped}", SECRET)
    other_salt = ("A" if salt[0] != "A" else "B") + salt[1:]
    with pytest.raises(VerifyMismatchError):
        verify_hash(f"{head}${other_salt}${digest}", SECRET)
    cheaper = head.replace("t=1", "t=2")
    with pytest.raises(VerifyMismatchError):
        verify_hash(f"{cheaper}${salt}${digest}", SECRET)


@pytest.mark.parametrize("malformed", [
    "", "plain text", "$argon2id$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ",  # too few parts
    "$argon2x$v=19$m=1024,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",  # no such type
    "$argon2id$v=19$m=1024,t=1$c2FsdHNhbHQ$aGFzaGhhc2g",  # a cost missing
    "$argon2id$v=19$m=1024,t=1,p=1$c2Fsd!!!$aGFzaGhhc2g",  # not base64
    "$argon2id$v=19$m=1024,t=1,p=1$c2E$aGFzaGhhc2g",  # a salt shorter than libargon2 allows
    "$argon2id$v=19$m=1024,t=0,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",  # no pass
    "$argon2id$v=19$m=1024,t=1,p=0$c2FsdHNhbHQ$aGFzaGhhc2g",  # no lane
])
def test_a_malformed_hash_is_refused_as_invalid(malformed):
    with pytest.raises(InvalidHashError):
        verify_hash(malformed, SECRET)
