"""Password reset links: issued off the request path, checked, and spent once (iam/authn/reset.py has the pages
and the rules they follow)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from iam.authn.store import AuthnStore
from iam.mail import Mailer
from iam.observability import audit

if TYPE_CHECKING:
    from iam.peers import Directory, UserClaims

log = logging.getLogger("iam.authn.reset")

RESET_TTL = 15 * 60
RESET_TEMPLATE = "password_reset"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class PasswordResets:
    """Reset links: issued off the request path, checked, and spent once."""

    def __init__(self, store: AuthnStore, mailer: Mailer, login_base: str, clock=time.time) -> None:
        self.store = store
        self.mailer = mailer
        self.login_base = login_base
        self.clock = clock
        self._pending: set[asyncio.Task[None]] = set()

    def request_later(self, directory: Directory, identifier: str) -> None:
        """Look the person up and mail them a link, after the answer has gone."""
        task = asyncio.create_task(self._send_link(directory, identifier))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def idle(self) -> None:
        """Until every requested link was issued and queued (tests; shutdown)."""
        while self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def _send_link(self, directory: Directory, identifier: str) -> None:
        try:
            user = await _lookup(directory, identifier)
            if user is None or not user.active or not user.email:
                return
            token = secrets.token_urlsafe(32)  # 256 bits
            await self.store.add_password_reset(_digest(token), user.sub, int(self.clock()) + RESET_TTL)
            link = f"{self.login_base}/authn/password/reset?{urlencode({'token': token})}"
            self.mailer.send(user.email, RESET_TEMPLATE, link=link, minutes=RESET_TTL // 60,
                             username=user.preferred_username, name=user.name or user.preferred_username)
            audit("password.reset_requested", actor=user.sub)
        except Exception:  # a background task: its failure is logged here, never lost
            log.exception("a password reset link could not be issued")

    async def subject(self, token: str) -> str | None:
        """The user of a live link, else None."""
        return await self.store.password_reset_subject(_digest(token), int(self.clock())) if token else None

    async def spend(self, token: str, subject: str) -> bool:
        return await self.store.take_password_reset(_digest(token), subject, int(self.clock()))

    async def purge_expired(self, now: int, batch: int) -> int:
        return await self.store.purge_password_resets(now, batch)


async def _lookup(directory: Directory, identifier: str) -> UserClaims | None:
    user = await directory.find(identifier)
    if user is None and "@" in identifier:
        user = await directory.find_by_email(identifier)
    return user
