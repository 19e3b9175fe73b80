"""The token role's services, built once per instance and reached by its handlers through `token_services()`."""

from __future__ import annotations

import time

from fastapi import Request

from iam.config import ClientConfig
from iam.jwks import KeySources
from iam.peers import Directory, UpstreamChecks
from iam.runtime import Shared, StartupError
from iam.token.access_tokens import AccessTokens, LiveToken
from iam.token.app_access import AppAccess
from iam.token.backchannel import BackChannelLogouts
from iam.token.client_assertions import ClientAssertions
from iam.token.client_metadata import ClientMetadataError
from iam.token.client_sync import ClientSync
from iam.token.clients import ClientRegistry
from iam.token.device_codes import DeviceApprovals
from iam.token.dpop import Nonces, ProofVerifier
from iam.token.hot_cache import HotCache, RevocationListener
from iam.token.initial_tokens import InitialAccessTokens
from iam.token.metadata import Documents
from iam.token.mtls import ClientCertificates
from iam.token.software_statements import SoftwareStatements
from iam.token.store import ClientRows, InitialTokenRows, TokenStore
from iam.token.stored_clients import StoredClients


class TokenServices:
    """Clients, the token store and its hot cache, the phantom pair, device approvals, a person's applications;
    and the user-management role (`directory`) and the authentication role's re-check of people who signed in
    through a connector (`upstream_checks`), in process or remote."""

    directory: Directory  # the user-management role: set by connect()
    upstream_checks: UpstreamChecks  # the authentication role's re-check of connector users: set by connect()

    def __init__(self, shared: Shared, grant_types: list[str]) -> None:
        settings = self.settings = shared.settings
        self.keys = shared.keys
        self.identity = shared.identity
        self.peer_keys = shared.peer_keys
        store = shared.stores["token"]
        # Live token rows for introspection and forward-auth. On PostgreSQL the cache is on only while the
        # revocation listener is connected (other replicas revoke too); on SQLite (one process) always.
        seconds = settings.introspection_cache_seconds
        self.hot_cache: HotCache[LiveToken] = HotCache(seconds, enabled=not store.is_postgresql)
        self.store = TokenStore(store.engine, self.hot_cache)
        self.key_sources = KeySources()  # the keys of private_key_jwt clients and of trusted workload issuers
        self.certificates = ClientCertificates(settings.mtls, settings.clients)  # RFC 8705
        self.clients = ClientRegistry(settings.clients, ClientAssertions(settings, self.store, self.key_sources),
                                      self.certificates)
        self.stored_clients = StoredClients(ClientRows(store.engine), yaml_ids=lambda: self.clients.yaml_ids,
                                            check=self._servable,
                                            changed=lambda client_id: self.client_sync.changed(client_id))
        self.client_sync = ClientSync(settings, self.clients, self.stored_clients)
        # Dynamic client registration (RFC 7591, iam/token/registration.py): who may register, and vouched metadata.
        self.initial_tokens = InitialAccessTokens(InitialTokenRows(store.engine),
                                                  rate_limit=settings.registration.rate_limit)
        self.software_statements = SoftwareStatements(settings.registration, self.key_sources)
        # On PostgreSQL one listening connection hears revocations and client changes. The cache is on only while
        # it is connected (other replicas revoke too); on SQLite (one process) always.
        self.revocation_listener: RevocationListener | None = None
        if store.is_postgresql:
            listener_name = {"application_name": RevocationListener.APPLICATION_NAME}
            self.revocation_listener = RevocationListener(
                self.hot_cache, lambda: store.connect_driver(server_settings=listener_name), self.client_sync.notified,
                self.client_sync.resync)
        # A token whose client is gone or disabled is inactive everywhere, even while its row is cached.
        self.access_tokens = AccessTokens(settings, self.keys, self.store, cache=self.hot_cache,
                                          client_known=self.clients.get)
        self.documents = Documents(settings, grant_types, self.keys)
        # Nonces keyed by the key ring's data key: the same on every replica that shares the key ring.
        self.dpop = ProofVerifier(settings.dpop, self.store, Nonces(settings.dpop, self.keys.data_key()))
        self.token_endpoint = settings.issuer.rstrip("/") + "/oauth/v2/token"
        self.device_approvals = DeviceApprovals(self.store, self.clients)
        self.app_access = AppAccess(self.store, self.clients)
        self.backchannel = BackChannelLogouts(settings.backchannel_logout, settings.issuer, self.keys, self.store,
                                              self.clients)

    def connect(self, directory: Directory, upstream_checks: UpstreamChecks) -> None:
        self.directory = directory
        self.upstream_checks = upstream_checks

    def check_keys(self) -> None:
        """Once the key ring is loaded: refuse a client whose signed responses the ring cannot sign."""
        for client in self.clients:
            alg = client.introspection_signed_response_alg
            if alg not in self.keys.jws_algorithms:
                raise StartupError(f"client {client.client_id}: introspection_signed_response_alg {alg} needs a key "
                                   f"the key ring does not hold (`iam keys rotate` adds one of every kind)")

    def _servable(self, client: ClientConfig) -> None:
        """What the config file's own checks ask of its clients, asked of a stored one (ClientMetadataError)."""
        known = {connector.id for connector in self.settings.connectors}
        for connector_id in client.connectors or ():
            if connector_id not in known:
                raise ClientMetadataError("invalid_client_metadata", f"connectors: no connector {connector_id!r}")
        if client.token_endpoint_auth_method == "tls_client_auth" and self.settings.mtls.ca_file is None:
            raise ClientMetadataError("invalid_client_metadata",
                                      "token_endpoint_auth_method: tls_client_auth needs mtls.ca_file on the server")
        alg = client.introspection_signed_response_alg
        if self.keys.jws_algorithms and alg not in self.keys.jws_algorithms:
            raise ClientMetadataError("invalid_client_metadata",
                                      f"introspection_signed_response_alg: the key ring holds no {alg} key")

    async def start(self) -> None:
        await self.client_sync.start()
        if self.revocation_listener is not None:
            self.revocation_listener.start()
        self.backchannel.start()

    async def stop(self) -> None:
        await self.client_sync.stop()
        await self.backchannel.stop()
        if self.revocation_listener is not None:
            await self.revocation_listener.stop()
        await self.key_sources.close()
        await self.store.close()

    def sweep(self) -> None:
        self.hot_cache.sweep(time.time())

    async def purge(self, now: int, batch: int) -> int:
        return await self.store.purge_expired(now, batch)


def token_services(request: Request) -> TokenServices:
    """The token role's services of the instance serving this request (iam/app.py sets them)."""
    services: TokenServices = request.app.state.iam.token
    return services
