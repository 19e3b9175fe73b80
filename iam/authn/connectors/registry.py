"""The configured connectors of an instance: built on first use, closed at shutdown."""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import cast

from iam.authn.connectors import PasswordConnector, RedirectConnector
from iam.config import ClientConfig, LdapConnectorConfig, OidcConnectorConfig, Settings
from iam.peers import ClientView

ConnectorConfig = OidcConnectorConfig | LdapConnectorConfig

# type -> the class that implements it
IMPLEMENTATIONS = {"oidc": "iam.authn.connectors.oidc:OidcConnector", "ldap": "iam.authn.connectors.ldap:LdapConnector"}


def build(config: ConnectorConfig) -> PasswordConnector | RedirectConnector:
    module, name = IMPLEMENTATIONS[config.type].split(":")
    return getattr(importlib.import_module(module), name)(config)


def callback_uri(settings: Settings, connector_id: str) -> str:
    """The upstream redirect URI of an oidc connector (a contract: operators register it at their provider)."""
    return f"{settings.issuer.rstrip('/')}/authn/connectors/{connector_id}/callback"


class Connectors:
    def __init__(self, configs: Iterable[ConnectorConfig], factory=build) -> None:
        self.configs = {config.id: config for config in configs}
        self.factory = factory
        self._built: dict[str, PasswordConnector | RedirectConnector] = {}

    def config(self, connector_id: str) -> ConnectorConfig | None:
        return self.configs.get(connector_id)

    def get(self, connector_id: str) -> PasswordConnector | RedirectConnector:
        found = self._built.get(connector_id)
        if found is None:
            found = self._built[connector_id] = self.factory(self.configs[connector_id])
        return found

    def redirect(self, connector_id: str) -> RedirectConnector:
        """An oidc connector (the browser goes to the provider)."""
        assert self.configs[connector_id].type == "oidc"
        return cast(RedirectConnector, self.get(connector_id))

    def password(self, connector_id: str) -> PasswordConnector:
        """An ldap connector (it checks a username and password itself)."""
        assert self.configs[connector_id].type == "ldap"
        return cast(PasswordConnector, self.get(connector_id))

    def offered(self, client: ClientConfig | ClientView | None) -> list[ConnectorConfig]:
        """The connectors the sign-in page offers for this client (its allow-list, else every one)."""
        allowed = None if client is None else client.connectors
        return [config for config in self.configs.values() if allowed is None or config.id in allowed]

    async def close(self) -> None:
        for connector in self._built.values():
            await connector.close()
        self._built.clear()
