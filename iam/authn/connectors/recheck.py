"""Re-checking a person with the connector they signed in through, when the token role refreshes their grant.

LDAP: the service bind looks the person up again (`lookup`); gone or disabled upstream, the grant ends, else their
profile and groups are refreshed. OIDC: iam cannot ask the provider about a person without them, so the check
is their next upstream sign-in (the grant lives at most its `grant_ttl`). A connector no longer configured
vouches for nobody.
"""

from __future__ import annotations

import logging

from iam.authn.connectors import ConnectorError
from iam.errors import PeerUnavailable, UserDisabled
from iam.observability import CONNECTOR_FAILURES, upstream_call

log = logging.getLogger("iam.authn.connectors")


class UpstreamChecks:
    def __init__(self, runtime) -> None:
        self.runtime = runtime

    async def recheck(self, sub: str, connector_id: str) -> bool:
        """Whether the person may go on; PeerUnavailable when the upstream cannot say now."""
        connectors = self.runtime.connectors
        config = connectors.config(connector_id)
        if config is None:
            return False
        if config.type != "ldap":
            return True
        accounts = self.runtime.upstream_accounts
        subject = await accounts.upstream_subject(sub, connector_id)
        if subject is None:
            return False
        try:
            with upstream_call(connector_id, "lookup"):
                identity = await connectors.password(connector_id).lookup(subject)
        except ConnectorError as exc:
            CONNECTOR_FAILURES.labels(connector_id, exc.reason).inc()
            log.warning("connector %s: could not re-check a user at refresh (%s)", connector_id, exc.reason)
            raise PeerUnavailable(f"connector {connector_id} is unavailable") from None
        if identity is None:
            CONNECTOR_FAILURES.labels(connector_id, "gone").inc()
            return False
        try:
            await accounts.provision(identity, config.link_by)
        except UserDisabled:
            return False
        return True
