"""A person's applications: which clients hold a live grant of theirs, and removing one's access
(ASVS 5 V10.4.9: refresh tokens and reference access tokens revocable by the user).

The authentication role's account page calls this: in process in `all`, else through the internal API below.
"""

from __future__ import annotations

import time

from fastapi import APIRouter, Request, Response

from iam.errors import json_response
from iam.internal import require_peer
from iam.roles import Role

router = APIRouter()


class AppAccess:
    def __init__(self, iam) -> None:
        self.iam = iam

    async def applications(self, sub: str) -> list[dict]:
        """One entry per client: its name, the union of the scopes granted, since when, and until when at most."""
        apps: dict[str, dict] = {}
        for grant in await self.iam.token_store.live_grants(sub, int(time.time())):
            client = self.iam.clients.get(grant["client_id"])
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
        return await self.iam.token_store.revoke_client_grants(sub, client_id)


@router.get("/internal/v1/subjects/{sub}/applications")
async def applications_for_peer(sub: str, request: Request) -> Response:
    await require_peer(request, Role.TOKEN, Role.AUTHENTICATION)
    return json_response({"applications": await request.app.state.iam.app_access.applications(sub)})


@router.delete("/internal/v1/subjects/{sub}/applications/{client_id}")
async def remove_for_peer(sub: str, client_id: str, request: Request) -> Response:
    await require_peer(request, Role.TOKEN, Role.AUTHENTICATION)
    removed = await request.app.state.iam.app_access.remove(sub, client_id)
    return json_response({"removed": removed})
