"""The authentication role's services, built once per instance and reached by its handlers through
`authn_services()`."""

from __future__ import annotations

import logging

from fastapi import Request

from iam.authn.clients import SignInClients
from iam.authn.connectors.pending import PendingRequests
from iam.authn.connectors.recheck import UpstreamChecks
from iam.authn.connectors.registry import Connectors
from iam.authn.credentials import CredentialService
from iam.authn.passkeys import Passkeys
from iam.authn.reset_links import PasswordResets
from iam.authn.sessions import Sessions
from iam.authn.store import AuthnStore
from iam.authn.throttle import Throttle
from iam.authn.totp import Totp
from iam.authn.verification_links import EmailVerification
from iam.keys import DATA_KEY, KeyRingError
from iam.mail import Mailer
from iam.observability import SSO_SESSIONS
from iam.peers import AppAccess, DeviceApprovals, Directory, SessionEvents, UpstreamAccounts
from iam.runtime import Shared, StartupError

log = logging.getLogger("iam")


class AuthnServices:
    """Credentials, SSO sessions, sign-in throttling, TOTP, passkeys, consents and the connectors; and the peers the
    pages need: the user-management role (`directory`) and the token role (`app_access`, `device_approvals`)."""

    # The peers, set by connect().
    directory: Directory
    upstream_accounts: UpstreamAccounts  # the directory's accounts of people from connectors
    app_access: AppAccess
    device_approvals: DeviceApprovals

    def __init__(self, shared: Shared) -> None:
        settings = self.settings = shared.settings
        self.keys = shared.keys
        self.identity = shared.identity
        self.peer_keys = shared.peer_keys
        self.store = AuthnStore(shared.stores["authn"].engine)  # the role's SQL, all of it
        self.sessions = Sessions(self.store, settings.session_ttl, settings.session_idle_ttl)
        self.credentials = CredentialService(self.store, self.sessions)
        self.throttle = Throttle(self.store, shared.identity, shared.peer_keys)
        self.totp = Totp(self.store)
        self.passkeys = Passkeys(self.store, settings.issuer, settings.login_base)
        self.mailer = Mailer(settings.mail)
        self.password_resets = PasswordResets(self.store, self.mailer, settings.login_base)
        self.email_verification = self.credentials.verification = EmailVerification(
            shared.identity, shared.peer_keys, self.mailer, settings.login_base)
        self.connectors = Connectors(settings.connectors)  # upstream OIDC providers and LDAP directories
        self.clients = SignInClients(settings)  # the clients sign-ins are for: theirs and the stored ones
        self.pending_upstream = PendingRequests(self.store)
        self.upstream_checks = UpstreamChecks(self)
        self.account_links = ([{"href": "/authn/kubeconfig", "text": "Get a kubeconfig"}]
                              if settings.kubernetes.clusters else [])

    def connect(self, directory: Directory, upstream_accounts: UpstreamAccounts, app_access: AppAccess,
                device_approvals: DeviceApprovals, session_events: SessionEvents) -> None:
        self.directory = self.email_verification.directory = directory
        self.sessions.events = session_events
        self.upstream_accounts = upstream_accounts
        self.app_access = app_access
        self.device_approvals = device_approvals

    def start(self) -> None:
        self.totp.data_key = self._data_key()
        self.mailer.start()
        self.clients.start()

    def _data_key(self) -> str | None:
        """The key directory's data key, created on first run where the directory is writable."""
        try:
            try:
                key = self.keys.data_key(generate=True)
            except OSError:  # a read-only mounted Secret: only what was provisioned
                key = self.keys.data_key()
        except (KeyRingError, OSError) as exc:
            raise StartupError(f"data key: {exc}") from None
        if key is None:
            log.warning("no %s in %s: TOTP secrets are stored unsealed (`iam keys rotate` creates it)",
                        DATA_KEY, self.settings.keys.dir)
        return key

    async def purge(self, now: int, batch: int) -> int:
        return (await self.sessions.purge_ended(now, batch) + await self.throttle.purge_stale(now, batch)
                + await self.pending_upstream.purge_expired(now, batch)
                + await self.password_resets.purge_expired(now, batch)
                + await self.passkeys.purge_expired(now, batch))

    async def stop(self) -> None:
        await self.clients.stop()
        await self.connectors.close()
        await self.password_resets.idle()
        await self.mailer.stop()

    async def update_gauges(self) -> None:
        SSO_SESSIONS.set(await self.sessions.count_live())


def authn_services(request: Request) -> AuthnServices:
    """The authentication role's services of the instance serving this request (iam/app.py sets them)."""
    services: AuthnServices = request.app.state.iam.authn
    return services
