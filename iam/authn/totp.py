"""Time-based one-time passwords (RFC 6238) as a second factor, with each code accepted once."""

from __future__ import annotations

import base64
import hashlib
import logging
import secrets
import time

import pyotp
import segno
from cryptography.exceptions import InvalidTag

from iam.authn.store import AuthnStore
from iam.http import is_digits
from iam.security import seal, unseal

log = logging.getLogger("iam.authn.totp")

ISSUER_NAME = "iam"


class TotpAlreadyEnabled(Exception):
    """Enrolment was asked for while a confirmed factor exists; it must be removed first."""


RECOVERY_CODES = 10
# A recovery code: 16 characters of RFC 4648 base32 (80 bits), shown as four groups of four. With 80 bits a plain
# SHA-256 at rest is enough (NIST SP 800-63B §5.1.1.2 asks a memorized secret's slow hash for its low entropy;
# no offline search gets through 2^80): checking costs no argon2 run, and no key that `iam keys rotate` changes.
RECOVERY_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
RECOVERY_LENGTH = 16

TOTP_CODE, RECOVERY_CODE = "totp", "recovery code"  # what a second step was passed with

SEALED = "v1:"  # a stored secret sealed with the data key (AES-256-GCM, bound to its subject)


class Totp:
    def __init__(self, store: AuthnStore, clock=time.time, data_key: str | None = None) -> None:
        self.store = store
        self.clock = clock
        # The key ring's data key (iam/keys.py): with it, secrets are stored sealed, and clear ones are sealed
        # at their next use. Without it (none was provisioned), they are stored as they are.
        self.data_key = data_key

    def _seal(self, subject: str, secret: str) -> str:
        if not self.data_key:
            return secret
        sealed = seal(self.data_key, b"iam totp:" + subject.encode(), secret.encode())
        return SEALED + base64.urlsafe_b64encode(sealed).decode()

    def _open(self, subject: str, stored: str) -> str | None:
        if not stored.startswith(SEALED):
            return stored
        if not self.data_key:
            log.error("a sealed TOTP secret cannot be read: the key directory has no data key")
            return None
        try:
            return unseal(self.data_key, b"iam totp:" + subject.encode(),
                          base64.urlsafe_b64decode(stored[len(SEALED):])).decode()
        except (InvalidTag, ValueError):
            log.error("a sealed TOTP secret does not open with this data key (or belongs to another user)")
            return None

    async def enabled(self, subject: str) -> bool:
        return await self.store.totp_confirmed(subject)

    async def start_enrolment(self, subject: str) -> str:
        """A new, unconfirmed secret (replacing an unconfirmed one); a confirmed factor is never replaced here."""
        secret = pyotp.random_base32()
        if await self.store.start_totp(subject, self._seal(subject, secret)):
            return secret
        # A confirmed factor, or a concurrent enrolment that won the insert: show that one's secret.
        pending = await self.pending_secret(subject)
        if pending is None:
            raise TotpAlreadyEnabled(subject)
        return pending

    async def pending_secret(self, subject: str) -> str | None:
        row = await self.store.totp_factor(subject, confirmed=False)
        return None if row is None else self._open(subject, row.secret)

    async def verify(self, subject: str, code: str, *, confirming: bool = False) -> bool:
        """Check a code (±1 step of clock skew); a code's step is remembered so it cannot be replayed."""
        code = code.strip().replace(" ", "")
        if not (is_digits(code) and len(code) == 6):
            return False
        row = await self.store.totp_factor(subject, confirmed=not confirming)
        secret = None if row is None else self._open(subject, row.secret)
        if secret is None or row is None:
            return False
        generator = pyotp.TOTP(secret)
        now = self.clock()
        step = next(
            (generator.timecode(now) + skew for skew in (0, -1, 1)
             if pyotp.utils.strings_equal(generator.at(now + skew * generator.interval), code)),
            None,
        )
        if step is None or step <= row.last_step:
            return False
        # Written only if no other request used a step meanwhile; the secret is sealed from now on.
        return await self.store.use_totp_step(subject, last_step=row.last_step, step=step,
                                              secret=self._seal(subject, secret))

    async def remove(self, subject: str) -> None:
        await self.store.remove_totp(subject)

    async def second_step(self, subject: str, code: str) -> str | None:
        """What `code` passes the second step with (TOTP_CODE or RECOVERY_CODE, each spent by this call), or None.
        Either is a one-time password (RFC 8176 §2 "otp")."""
        if await self.verify(subject, code):
            return TOTP_CODE
        if await self.use_recovery_code(subject, code):
            return RECOVERY_CODE
        return None

    # -- recovery codes: each accepted once instead of a TOTP code --------------------------------------------
    async def new_recovery_codes(self, subject: str) -> list[str]:
        """Ten fresh codes replacing any earlier ones; they are shown once and only their digests are kept."""
        codes = ["".join(secrets.choice(RECOVERY_ALPHABET) for _ in range(RECOVERY_LENGTH))
                 for _ in range(RECOVERY_CODES)]
        await self.store.replace_recovery_codes(subject, [_recovery_digest(subject, c) for c in codes],
                                                int(self.clock()))
        return [" ".join(code[i:i + 4] for i in range(0, RECOVERY_LENGTH, 4)) for code in codes]

    async def recovery_codes_left(self, subject: str) -> int:
        return await self.store.count_recovery_codes(subject)

    async def use_recovery_code(self, subject: str, code: str) -> bool:
        """Whether `code` is one of the subject's unused recovery codes; it is spent by this call (of two
        requests with the same code, one wins). Spaces, dashes and case do not matter."""
        code = code.upper().replace(" ", "").replace("-", "")
        if len(code) != RECOVERY_LENGTH or not set(code) <= set(RECOVERY_ALPHABET):
            return False
        if not await self.enabled(subject):  # the codes stand in for a factor that is on
            return False
        return await self.store.take_recovery_code(subject, _recovery_digest(subject, code))


def _recovery_digest(subject: str, code: str) -> bytes:
    """Bound to its subject: a digest copied to another user's rows matches nothing."""
    return hashlib.sha256(f"iam recovery code:{subject}:{code}".encode()).digest()


def provisioning(secret: str, account: str) -> tuple[str, str]:
    """The otpauth:// URI and an inline SVG QR code of it, for authenticator apps."""
    uri = pyotp.TOTP(secret).provisioning_uri(name=account, issuer_name=ISSUER_NAME)
    return uri, segno.make(uri, error="m").svg_data_uri(scale=4)
