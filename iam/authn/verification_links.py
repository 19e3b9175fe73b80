"""Address verification links: a signed statement "this user, at this address", good for VERIFY_TTL.

No row is kept: the link is a JWT signed by the authentication role (typ iam-email-verification+jwt), naming the
user and the address it was sent to. Opening it makes the directory mark the address verified only while the
user's address is still that one, so a link sent before the address changed verifies nothing (iam/users:
`confirm_email`). Using it twice does no more than once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from iam.mail import Mailer
from iam.observability import audit
from iam.peers import PeerKeys, ServiceIdentity
from iam.roles import Role

if TYPE_CHECKING:
    from iam.peers import Directory

VERIFY_TYP = "iam-email-verification+jwt"
VERIFY_TTL = 24 * 3600
VERIFY_TEMPLATE = "email_verification"


class EmailVerification:
    def __init__(self, identity: ServiceIdentity, peer_keys: PeerKeys, mailer: Mailer, login_base: str) -> None:
        self.identity = identity
        self.peer_keys = peer_keys
        self.mailer = mailer
        self.login_base = login_base
        self.directory: Directory | None = None  # set when the roles are connected

    async def send(self, sub: str) -> bool:
        """Mail the user a link for their current address; False when mail is off, or no unverified address."""
        assert self.directory is not None
        user = await self.directory.claims(sub)
        if not self.mailer.configured or user is None or not user.active or not user.email or user.email_verified:
            return False
        token = self.identity.sign(Role.AUTHENTICATION, VERIFY_TYP, {"sub": sub, "email": user.email},
                                   issuer=Role.AUTHENTICATION, ttl=VERIFY_TTL)
        link = f"{self.login_base}/authn/email/verify?{urlencode({'token': token})}"
        sent = self.mailer.send(user.email, VERIFY_TEMPLATE, link=link, hours=VERIFY_TTL // 3600,
                                username=user.preferred_username, name=user.name or user.preferred_username)
        if sent:
            audit("email.verification_sent", actor=sub)
        return sent

    async def statement(self, token: str) -> dict[str, Any] | None:
        """The link's user and address, if it is genuine and unexpired."""
        claims = await self.peer_keys.verify_own(token, role=Role.AUTHENTICATION, typ=VERIFY_TYP, max_ttl=VERIFY_TTL)
        if claims is None or not isinstance(claims.get("sub"), str) or not isinstance(claims.get("email"), str):
            return None
        return claims

    async def confirm(self, token: str) -> bool:
        """Whether the link verified the address it was sent to (still the user's)."""
        assert self.directory is not None
        claims = await self.statement(token)
        return claims is not None and await self.directory.confirm_email(claims["sub"], claims["email"])
