"""Time-based one-time passwords (RFC 6238) as a second factor, with each code accepted once."""

from __future__ import annotations

import base64
import logging
import time

import pyotp
import segno
from cryptography.exceptions import InvalidTag
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from iam.authn.store import totp
from iam.http import is_digits
from iam.security import seal, unseal

log = logging.getLogger("iam.authn.totp")

ISSUER_NAME = "iam"


class TotpAlreadyEnabled(Exception):
    """Enrolment was asked for while a confirmed factor exists; it must be removed first."""


SEALED = "v1:"  # a stored secret sealed with the data key (AES-256-GCM, bound to its subject)


class Totp:
    def __init__(self, engine: AsyncEngine, clock=time.time, data_key: str | None = None) -> None:
        self.engine = engine
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
        async with self.engine.connect() as conn:
            return bool(
                (await conn.execute(select(totp.c.confirmed).where(totp.c.subject == subject))).scalar()
            )

    async def start_enrolment(self, subject: str) -> str:
        """A new, unconfirmed secret (replacing an unconfirmed one); a confirmed factor is never replaced here."""
        secret = pyotp.random_base32()
        try:
            async with self.engine.begin() as conn:
                await conn.execute(delete(totp).where(totp.c.subject == subject, totp.c.confirmed.is_(False)))
                await conn.execute(insert(totp).values(subject=subject, secret=self._seal(subject, secret),
                                                       confirmed=False, last_step=0))
            return secret
        except IntegrityError:
            # A confirmed factor, or a concurrent enrolment that won the insert: show that one's secret.
            pending = await self.pending_secret(subject)
            if pending is None:
                raise TotpAlreadyEnabled(subject) from None
            return pending

    async def pending_secret(self, subject: str) -> str | None:
        async with self.engine.connect() as conn:
            stored = (
                await conn.execute(
                    select(totp.c.secret).where(totp.c.subject == subject, totp.c.confirmed.is_(False))
                )
            ).scalar()
        return None if stored is None else self._open(subject, stored)

    async def verify(self, subject: str, code: str, *, confirming: bool = False) -> bool:
        """Check a code (±1 step of clock skew); a code's step is remembered so it cannot be replayed."""
        code = code.strip().replace(" ", "")
        if not (is_digits(code) and len(code) == 6):
            return False
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(
                    select(totp).where(totp.c.subject == subject, totp.c.confirmed.is_(not confirming))
                )
            ).first()
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
            won = await conn.execute(
                update(totp)
                .where(totp.c.subject == subject, totp.c.last_step == row.last_step)
                .values(last_step=step, confirmed=True, secret=self._seal(subject, secret))  # sealed from now on
            )
            return won.rowcount == 1

    async def remove(self, subject: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(delete(totp).where(totp.c.subject == subject))


def provisioning(secret: str, account: str) -> tuple[str, str]:
    """The otpauth:// URI and an inline SVG QR code of it, for authenticator apps."""
    uri = pyotp.TOTP(secret).provisioning_uri(name=account, issuer_name=ISSUER_NAME)
    return uri, segno.make(uri, error="m").svg_data_uri(scale=4)
