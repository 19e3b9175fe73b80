"""Just-in-time users for people who sign in through an upstream connector (README, "Sign-in through a connector").

The identity is (connector id, upstream subject): stable across email and username changes. At each upstream
sign-in `provision()` finds the link and refreshes what the connector owns; a first sign-in links an existing
local account only by a verified address when the connector says `link_by: email`, and otherwise creates a user.
A username that an unrelated local user holds is never linked: the new user is named `<username>@<connector id>`.

Groups a connector reports are kept in their own table, apart from SCIM groups, and replaced at every sign-in;
both appear in the `groups` claim. Concurrent first sign-ins of one person end with one user: the user row and
its link are written in one transaction, and the loser of the race finds the winner's link when it retries.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from typing import Any

from sqlalchemy.engine import Row
from sqlalchemy.exc import IntegrityError

from iam.errors import UserDisabled
from iam.observability import audit
from iam.peers import UpstreamIdentity, UserClaims
from iam.users.directory import RETRIES, Directory, DirectoryError
from iam.users.store import NewUser

log = logging.getLogger("iam.users.upstream")

MAX_GROUPS = 1000  # a huge upstream group list is cut here (fail safe: fewer groups, never more)
MAX_NAME = 255


def _clean(value: str | None) -> str | None:
    """A profile value fit for the directory (printable, trimmed, ≤ 255), else None."""
    if value is None:
        return None
    value = value.strip()[:MAX_NAME].strip()
    return value if value and not any(ord(c) < 0x20 for c in value) else None


def _group_names(upstream: UpstreamIdentity) -> list[str]:
    names = sorted({name for g in upstream.groups if (name := _clean(g)) is not None})
    if len(names) > MAX_GROUPS:
        log.warning("connector %s reported %d groups for one user; keeping the first %d",
                    upstream.connector_id, len(names), MAX_GROUPS)
    return names[:MAX_GROUPS]


class UpstreamAccounts:
    """The user-management side of connector sign-ins, over the directory's store."""

    def __init__(self, directory: Directory) -> None:
        self.directory = directory
        self.store = directory.store

    async def provision(self, identity: UpstreamIdentity, link_by: str | None = None) -> UserClaims:
        """The user for an upstream sign-in: found by link, linked by verified email, or created.

        Raises UserDisabled for a user disabled in the directory (the sign-in must fail).
        """
        groups = _group_names(identity)
        for _ in range(RETRIES):
            link = await self._link(identity)
            owner = None if link is not None or link_by != "email" else await self._verified_owner(identity)
            try:
                if link is not None:
                    await self._active_claims(link.user_id)  # refused before anything is written
                    await self._refresh(link, identity, groups)
                    user_id = link.user_id
                elif owner is not None:
                    await self._active_claims(owner)  # a disabled owner is refused, never bypassed
                    user_id = await self._add_link(owner, identity, groups)
                    audit("user.linked", actor=owner, user=owner, connector=identity.connector_id, link_by="email")
                else:
                    user_id = await self._create(identity, groups)
                    audit("user.created", actor=user_id, user=user_id, connector=identity.connector_id,
                          groups=groups)
            except IntegrityError:
                continue  # a concurrent first sign-in won (or took the name): look again
            return await self._active_claims(user_id)
        raise DirectoryError("conflict", "concurrent sign-ins changed this user too often; retry")

    async def upstream_subject(self, sub: str, connector_id: str) -> str | None:
        """The subject a user has at a connector (for re-checks with the upstream), if linked."""
        return await self.store.upstream_subject(sub, connector_id)

    async def _active_claims(self, user_id: str) -> UserClaims:
        claims = await self.directory.claims(user_id)
        if claims is None:
            raise DirectoryError("conflict", "the user was deleted meanwhile; retry")
        if not claims.active:
            raise UserDisabled(f"user {user_id} is disabled")
        return claims

    async def _link(self, upstream: UpstreamIdentity) -> Row[Any] | None:
        return await self.store.link(upstream.connector_id, upstream.subject)

    async def _verified_owner(self, upstream: UpstreamIdentity) -> str | None:
        """The one local user whose primary address is this verified one, not yet linked at this connector."""
        email = _clean(upstream.email)
        if not upstream.email_verified or email is None:
            return None  # never by an unverified address: that would be an account takeover
        owners = await self.store.verified_owners(email.lower(), limit=2)
        if len(owners) != 1 or await self.store.linked_at(upstream.connector_id, owners[0]):
            return None
        return owners[0]

    async def _add_link(self, user_id: str, upstream: UpstreamIdentity, groups: list[str]) -> str:
        await self.store.add_link(user_id, upstream.connector_id, upstream.subject, groups, int(time.time()))
        return user_id

    async def _free_name(self, upstream: UpstreamIdentity) -> str:
        """The username for a new user: the upstream's, unless someone has it (then `<name>@<connector id>`)."""
        base = _clean(upstream.username) or _clean(upstream.email) or _clean(upstream.subject) or "user"
        suffix = hashlib.sha256(upstream.subject.encode()).hexdigest()[:8]
        for candidate in (base, f"{base}@{upstream.connector_id}", f"{base}@{upstream.connector_id}-{suffix}"):
            candidate = candidate[-MAX_NAME:].strip()
            if await self.directory.find_id(candidate) is None:
                return candidate
        raise DirectoryError("uniqueness", "every candidate username is taken")

    async def _create(self, upstream: UpstreamIdentity, groups: list[str]) -> str:
        user_name = await self._free_name(upstream)
        email = _clean(upstream.email)
        new = NewUser(user_name=user_name, email=email.lower() if email else None,
                      email_verified=bool(email and upstream.email_verified), display_name=_clean(upstream.name))
        user_id = str(uuid.uuid4())
        await self.store.add_linked_user(user_id, new, upstream.connector_id, upstream.subject, groups,
                                         int(time.time()))
        return user_id

    async def _refresh(self, link: Row[Any], upstream: UpstreamIdentity, groups: list[str]) -> None:
        """What the connector owns, as the upstream says now: its groups, and the profile of a user it created."""
        if not link.provisioned:  # a local account linked by email: its profile stays the directory's
            await self.store.refresh_link(link, groups, int(time.time()))
            return
        email = _clean(upstream.email)
        email = email.lower() if email else None
        profile = {"display_name": _clean(upstream.name), "email": email,
                   "email_verified": bool(email and upstream.email_verified)}
        # A renamed upstream account takes its new name when nobody else has it; else it keeps the old one.
        await self.store.refresh_link(link, groups, int(time.time()), profile=profile,
                                      user_name=_clean(upstream.username))
