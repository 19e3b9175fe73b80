"""Device codes (RFC 8628): their lifetime and polling interval, the user code's digest as stored, and what the
authentication role may do with a user code once a person has entered it."""

from __future__ import annotations

import hashlib
import time
import uuid
from typing import Any

from iam.formats import normalise_user_code
from iam.token.claims import how_signed_in
from iam.token.clients import ClientRegistry
from iam.token.store import TokenStore

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEVICE_CODE_TTL = 600
POLL_INTERVAL = 5


def user_code_digest(code: str) -> bytes:
    return hashlib.sha256(code.encode()).digest()


class DeviceApprovals:
    """What the authentication role may do with a user code: look it up, then approve or deny it once."""

    def __init__(self, store: TokenStore, clients: ClientRegistry) -> None:
        self.store = store
        self.clients = clients

    async def device_lookup(self, user_code: str) -> dict[str, Any] | None:
        code = normalise_user_code(user_code)
        found = code and await self.store.find_device_code(user_code=user_code_digest(code))
        if not found or found["status"] != "pending" or found["expires_at"] < time.time():
            return None
        return {"client_id": found["client_id"], "scope": found["scope"]}

    async def device_decide(self, user_code: str, approve: bool, session: dict[str, Any]) -> bool:
        code = normalise_user_code(user_code)
        found = code and await self.store.find_device_code(user_code=user_code_digest(code))
        if not found or code is None:
            return False
        client = self.clients.get(found["client_id"])
        now = int(time.time())
        grant = None
        if approve and client is not None:
            offline = "offline_access" in found["scope"].split()
            grant = {
                "id": uuid.uuid4().hex, "client_id": client.client_id, "subject": session["sub"],
                "scope": found["scope"], "sid": session.get("sid"), "auth_time": session["auth_time"],
                **how_signed_in(session), "nonce": None, "offline": offline,
                "created_at": now, "expires_at": now + (client.offline_grant_ttl if offline else client.grant_ttl),
                "revoked": False,
            }
        return await self.store.decide_device_code(user_code_digest(code), now, grant)
