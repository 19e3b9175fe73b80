"""Registered clients and client authentication (RFC 6749 §2.3).

Secrets never stay in memory in clear: a secret from the environment is kept as its SHA-256 digest, and a
configured argon2id hash is verified once, then its digest is remembered, so the hot paths (introspection,
token issuance) cost one hash and one constant-time comparison instead of an argon2 run per request.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import time
from collections.abc import Callable, Iterator
from urllib.parse import unquote

from argon2.exceptions import InvalidHashError, VerificationError
from cryptography import x509
from fastapi import Request

from iam.config import MTLS_METHODS, ClientConfig
from iam.errors import OAuthError, invalid_client
from iam.observability import CLIENT_AUTH_FAILURES, audit, source_of
from iam.security import slow_hash, verify_hash
from iam.token.client_assertions import ASSERTION_TYPE, ClientAssertions, claimed_client
from iam.token.mtls import ClientCertificates
from iam.token.stored_clients import StoredClient

log = logging.getLogger("iam.clients")

_DUMMY = hashlib.sha256(b"iam: no such client").digest()


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class ClientRegistry:
    """Every client an endpoint may meet, by client_id: those of the YAML config first (authoritative: a stored
    client never shadows one), then the enabled stored clients (iam/token/stored_clients.py), kept in memory and
    changed as the store tells (`put_stored`), so a lookup stays one dict lookup."""

    def __init__(self, clients: list[ClientConfig], assertions: ClientAssertions,
                 certificates: ClientCertificates, clock: Callable[[], float] = time.time) -> None:
        self.assertions = assertions
        self.certificates = certificates
        self._base = assertions.issuer.rstrip("/")  # + an endpoint's path: the URL an assertion's aud may name
        self._clock = clock
        self._clients: dict[str, ClientConfig] = {}
        self._digests: dict[str, bytes] = {}
        # A stored client's previous secret during a rotation's grace period: (digest, until epoch seconds).
        self._previous: dict[str, tuple[bytes, int]] = {}
        self._hashes: dict[str, str] = {}
        self._yaml_ids: frozenset[str] = frozenset()
        self._yaml: dict[str, ClientConfig] = {}
        self._stored: dict[str, StoredClient] = {}
        self.set_yaml(clients)
        self._argon2_slots = asyncio.Semaphore(2)  # bounds memory and CPU spent on argon2 at once

    @property
    def yaml_ids(self) -> frozenset[str]:
        """The client ids of the YAML config, disabled ones included: none of them can be stored."""
        return self._yaml_ids

    def yaml_client(self, client_id: str) -> ClientConfig | None:
        """A client of the YAML config, disabled or not."""
        return self._yaml.get(client_id)

    def set_yaml(self, clients: list[ClientConfig]) -> None:
        """Take the YAML config's clients (at start, and when the config file changed)."""
        for client_id in self._yaml_ids:
            self._drop(client_id)
        self._yaml_ids = frozenset(client.client_id for client in clients)
        self._yaml = {client.client_id: client for client in clients}
        for client in clients:
            self._stored.pop(client.client_id, None)  # the config wins
            if not client.enabled:
                log.warning("client %s has an empty client_secret: it is disabled", client.client_id)
                continue
            self._add(client)
            if client.client_secret is not None and client.client_secret.get_secret_value():
                self._digests[client.client_id] = _digest(client.client_secret.get_secret_value())
            elif client.client_secret_hash:
                self._hashes[client.client_id] = client.client_secret_hash
        for stored in list(self._stored.values()):
            self.put_stored(stored.client_id, stored)

    def set_stored(self, clients: list[StoredClient]) -> None:
        """Take every stored client afresh (at start, and whenever change notices may have been missed). A client
        held as this very object is unchanged (`StoredClients.all` gives it again): it is kept as it is."""
        fresh = {stored.client_id: stored for stored in clients}
        for client_id in [held for held in self._stored if held not in fresh]:
            self.put_stored(client_id, None)
        for client_id, stored in fresh.items():
            if self._stored.get(client_id) is not stored:
                self.put_stored(client_id, stored)

    def put_stored(self, client_id: str, stored: StoredClient | None) -> None:
        """A stored client as it now is; None: deleted. A disabled one is unknown to every endpoint, and its tokens
        are inactive (`AccessTokens` asks `get`)."""
        if client_id in self._yaml_ids:
            return
        self._stored.pop(client_id, None)
        self._drop(client_id)
        if stored is None:
            return
        self._stored[client_id] = stored
        if not stored.enabled:
            return
        self._add(stored.config)
        if stored.secret_digest is not None:
            self._digests[client_id] = stored.secret_digest
        if stored.previous_secret_digest is not None and stored.previous_expires_at is not None:
            self._previous[client_id] = (stored.previous_secret_digest, stored.previous_expires_at)

    def _add(self, client: ClientConfig) -> None:
        self._clients[client.client_id] = client
        self.assertions.learn(client)
        self.certificates.learn(client)

    def _drop(self, client_id: str) -> None:
        for known in (self._clients, self._digests, self._previous, self._hashes):
            known.pop(client_id, None)
        self.assertions.forget(client_id)
        self.certificates.forget(client_id)

    def get(self, client_id: str) -> ClientConfig | None:
        return self._clients.get(client_id)

    def stored(self) -> list[ClientConfig]:
        """The enabled stored clients (those the config file does not declare)."""
        return [stored.config for stored in self._stored.values() if stored.enabled]

    def __iter__(self) -> Iterator[ClientConfig]:
        return iter(self._clients.values())

    async def authenticate(self, authorization: str | None, form: dict[str, str], path: str,
                           certificate: x509.Certificate | None = None) -> ClientConfig:
        """Identify and authenticate the caller by exactly one method (RFC 6749 §2.3), at the endpoint `path`;
        `certificate`: the TLS client certificate presented, if any (RFC 8705 §2)."""
        if "client_assertion" in form or "client_assertion_type" in form:
            return await self._by_assertion(authorization, form, self._base + path)
        if authorization is not None:
            client_id, secret = _parse_basic(authorization)
            if "client_secret" in form:
                raise OAuthError("invalid_request", "use one client authentication method, not two")
            if form.get("client_id", client_id) != client_id:
                raise OAuthError("invalid_request", "client_id does not match the authenticated client")
            method = "client_secret_basic"
        elif "client_secret" in form:
            client_id, secret, method = form.get("client_id", ""), form["client_secret"], "client_secret_post"
        elif "client_id" in form:
            client_id, secret, method = form["client_id"], None, "none"
            registered = self._clients.get(client_id)
            if registered is not None and registered.token_endpoint_auth_method in MTLS_METHODS:
                # RFC 8705 §2: client_id in the request, the TLS client certificate is the credential.
                self.certificates.authenticate(registered, certificate)
                return registered
        else:
            raise invalid_client("client authentication is required")

        client = self._clients.get(client_id)
        if secret is not None:
            ok = await self._verify_secret(client_id, secret)
            if client is None or not ok:
                raise invalid_client()
        elif client is None:
            raise invalid_client()
        if client.token_endpoint_auth_method != method:
            raise invalid_client(f"client is registered for {client.token_endpoint_auth_method}")
        return client

    async def _by_assertion(self, authorization: str | None, form: dict[str, str], endpoint: str) -> ClientConfig:
        """RFC 7521 §4.2: a client assertion, for a private_key_jwt or workload_identity client."""
        if authorization is not None or "client_secret" in form:
            # RFC 7521 §4.2.1: more than one client authentication mechanism is invalid_client.
            raise invalid_client("use one client authentication method, not two")
        assertion = form.get("client_assertion")
        if assertion is None or form.get("client_assertion_type") != ASSERTION_TYPE:
            raise OAuthError("invalid_request", f"client_assertion with client_assertion_type {ASSERTION_TYPE}")
        # RFC 7523 §3: client_id is optional, the assertion's sub names the client (private_key_jwt).
        client_id = form.get("client_id") or claimed_client(assertion)
        client = self._clients.get(client_id) if client_id is not None else None
        if client is None:
            raise invalid_client()
        await self.assertions.verify(client, assertion, endpoint)
        return client

    async def _verify_secret(self, client_id: str, secret: str) -> bool:
        presented = _digest(secret)
        known = self._digests.get(client_id)
        if known is not None:
            current = hmac.compare_digest(presented, known)
            previous, until = self._previous.get(client_id, (_DUMMY, 0))
            # Both compared every time: which secret matched (or that there is a previous one) takes no longer.
            earlier = hmac.compare_digest(presented, previous) and self._clock() < until
            return current or earlier
        encoded = self._hashes.get(client_id)
        if encoded is None:
            hmac.compare_digest(presented, _DUMMY)  # same work for unknown clients
            return False
        async with self._argon2_slots:
            try:
                await slow_hash(verify_hash, encoded, secret)  # beside sign-ins, below the hot path
            except (VerificationError, InvalidHashError):
                return False
        self._digests[client_id] = presented
        return True


async def authenticate(request: Request, clients: ClientRegistry, form: dict[str, str]) -> ClientConfig:
    """Authenticate the calling client of an endpoint; failures are counted and audited."""
    try:
        return await clients.authenticate(request.headers.get("authorization"), form, request.scope["path"],
                                          _certificate(request, clients, form))
    except OAuthError as exc:
        if exc.error == "invalid_client":
            CLIENT_AUTH_FAILURES.inc()
            audit("client.auth_failed", "failure", client_id=_claimed(request, clients, form),
                  source=source_of(request), reason=exc.description)
        raise


def _certificate(request: Request, clients: ClientRegistry, form: dict[str, str]) -> x509.Certificate | None:
    """The TLS client certificate, looked for only when the named client authenticates with one."""
    client = clients.get(form.get("client_id", ""))
    if client is None or client.token_endpoint_auth_method not in MTLS_METHODS:
        return None
    return clients.certificates.presented(request)


def _claimed(request: Request, clients: ClientRegistry, form: dict[str, str]) -> str | None:
    """The registered client a failed authentication was for, from Basic or the form. Anything else is left out:
    whatever a caller sends as a client id may be a secret pasted in the wrong field."""
    claimed = form.get("client_id")
    authorization = request.headers.get("authorization")
    if authorization is not None:
        try:
            claimed = _parse_basic(authorization)[0]
        except OAuthError:
            pass
    return claimed if claimed is not None and clients.get(claimed) is not None else None


def _parse_basic(authorization: str) -> tuple[str, str]:
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "basic" or not credentials:
        raise invalid_client("unsupported authorization scheme")
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode()
    except ValueError:  # not base64 (binascii.Error), not ASCII, not UTF-8 (UnicodeDecodeError)
        raise invalid_client("malformed basic credentials") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep:
        raise invalid_client("malformed basic credentials")
    # RFC 6749 §2.3.1: id and secret are form-urlencoded before they are joined.
    return unquote(client_id.replace("+", " ")), unquote(secret.replace("+", " "))
