"""A person's applications: which clients hold a live grant of theirs, and removing one's access
(ASVS 5 V10.4.9: refresh tokens and reference access tokens revocable by the user).

The authentication role's account page calls this: in process in `all`, else through the internal API
(iam/token/internal.py).
"""

from __future__ import annotations

import time
from typing import Any

from iam.token.clients import ClientRegistry
from iam.token.store import TokenStore


class AppAccess:
    def __init__(self, store: TokenStore, clients: ClientRegistry) -> None:
        self.store = store
        self.clients = clients

    async def applications(self, sub: str) -> list[dict[str, Any]]:
        """One entry per client: its name, the union of the scopes granted, since when, and until when at most."""
        apps: dict[str, dict[str, Any]] = {}
        for grant in await self.store.live_grants(sub, int(time.time())):
            client = self.clients.get(grant["client_id"])
            app = apps.setdefault(grant["client_id"], {
                "client_id": grant["client_id"],
                "client_name": (client.client_name if client is not None else None) or grant["client_id"],
                "scope": [], "since": grant["created_at"], "until": grant["expires_at"],
            })
            app["scope"] = sorted(set(app["scope"]) | set(grant["scope"].split()))
            app["until"] = max(app["until"], grant["expires_at"])
        return list(apps.values())

    async def remove(self, sub: str, client_id: str) -> int:
        """Revoke every grant (and token) the person gave this client; returns how many grants ended."""
        return await self.store.revoke_client_grants(sub, client_id)
