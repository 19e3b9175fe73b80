"""The credential store's rules: argon2id hashes, verified and upgraded here and nowhere else."""

from __future__ import annotations

import functools
import time

from argon2.exceptions import InvalidHashError, VerificationError

from iam.authn.sessions import Sessions
from iam.authn.store import AuthnStore
from iam.authn.verification_links import EmailVerification
from iam.errors import PasswordRejected
from iam.security import hash_secret, needs_rehash, slow_hash, verify_hash

MIN_PASSWORD = 8  # ASVS 5 V6.2.1; longer passphrases are allowed up to MAX_PASSWORD
MAX_PASSWORD = 256

# A dummy hash verified for unknown users, so a missing account costs the same time as a wrong password.
_DUMMY_HASH = hash_secret("iam: timing equaliser")  # argon2id at iam's parameters (iam/security.py)


@functools.cache
def _common_passwords() -> frozenset[str]:
    """zxcvbn's list of the 30,000 most common passwords (lower case), loaded once."""
    from zxcvbn.frequency_lists import FREQUENCY_LISTS

    return frozenset(FREQUENCY_LISTS["passwords"])


def check_policy(password: str) -> None:
    """Length and a common-password list, and no composition rules (ASVS 5 V6.2.1, V6.2.4, V6.2.5, V6.2.9)."""
    if len(password) < MIN_PASSWORD:
        raise PasswordRejected(f"a password needs at least {MIN_PASSWORD} characters")
    if len(password) > MAX_PASSWORD:
        raise PasswordRejected(f"a password may have at most {MAX_PASSWORD} characters")
    if password.lower() in _common_passwords():
        raise PasswordRejected("this password is on a list of commonly used passwords; choose another")


class CredentialService:
    """The credential store as the user-management role sees it (iam.peers.Credentials), in process."""

    def __init__(self, store: AuthnStore, sessions: Sessions) -> None:
        self.store = store
        self.sessions = sessions
        self.verification: EmailVerification | None = None  # set with the role's services

    async def set_password(self, sub: str, password: str) -> None:
        check_policy(password)
        hashed = await slow_hash(hash_secret, password)
        await self.store.set_password_hash(sub, hashed, int(time.time()))

    async def remove(self, sub: str) -> None:
        """A deleted user: every credential of theirs goes (the password, any second factor), and their consents."""
        await self.store.remove_credentials(sub)

    async def end_sessions(self, sub: str) -> None:
        """A disabled or deleted user: every SSO session of theirs ends."""
        await self.sessions.end_all(sub)

    async def send_verification(self, sub: str) -> bool:
        """Mail the user a link that verifies their address (iam/authn/verification_links.py)."""
        return self.verification is not None and await self.verification.send(sub)

    async def reset_second_factor(self, sub: str) -> bool:
        """Remove a user's second factors, TOTP and passkeys (lost authenticators): the next sign-in needs only the
        password. Returns whether there was one."""
        return await self.store.remove_second_factors(sub)

    async def verify(self, sub: str | None, password: str) -> bool:
        """Check a password in constant work whether or not the subject has one; upgrade old hashes."""
        stored = None if sub is None else await self.store.password_hash(sub)
        if len(password) > MAX_PASSWORD:
            return False
        try:
            await slow_hash(verify_hash, stored or _DUMMY_HASH, password)
        except (VerificationError, InvalidHashError):
            return False
        if stored is None:
            return False
        if needs_rehash(stored) and sub is not None:
            await self.store.upgrade_password_hash(sub, await slow_hash(hash_secret, password))
        return True
