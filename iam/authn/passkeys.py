"""Passkeys (WebAuthn Level 2/3): registration on the account page, sign-in with a passkey alone or as the second
step after a password.

py_webauthn (Duo Labs) parses and verifies what the browser sends: clientDataJSON, the authenticator data, the
CBOR attestation object, COSE keys and signatures; nothing of that is parsed here. This module holds the rules
around it: the RP ID and origins from the issuer, single-use challenges bound to the session or sign-in that asked,
the stored sign counter (a regression is refused, WebAuthn §6.1.1) and backup flags (BE may never change,
WebAuthn L3 §6.1.3), and what a sign-in proved (RFC 8176 amr values).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import (
    parse_authentication_credential_json,
    parse_client_data_json,
    parse_registration_credential_json,
)
from webauthn.helpers.cose import COSEAlgorithmIdentifier
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    AuthenticatorTransport,
    CredentialDeviceType,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

from iam.authn.store import AuthnStore
from iam.security import constant_time_equal

log = logging.getLogger("iam.authn.passkeys")

RP_NAME = "iam"
REGISTER, SIGN_IN, SECOND_FACTOR = "register", "sign-in", "second-factor"  # what a challenge is for
CHALLENGE_TTL = 300  # seconds between the options and the browser's answer
MAX_PASSKEYS = 20  # per person: the account page and allowCredentials stay short
NAME_LENGTH = 64
RESPONSE_LENGTH = 16_000  # a browser's JSON answer, at most (an attestation with certificates fits)
ALGORITHMS = [COSEAlgorithmIdentifier.ECDSA_SHA_256, COSEAlgorithmIdentifier.EDDSA,
              COSEAlgorithmIdentifier.RSASSA_PKCS1_v1_5_SHA_256]


class PasskeyRejected(Exception):
    """A registration or assertion that is refused; `reason` is for the audit log, never shown as it is."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Passkey:
    """A registered passkey as the account page lists it."""

    id: str
    name: str
    created_at: int
    last_used_at: int | None
    synced: bool  # backup eligible: the provider may copy it to the person's other devices


@dataclass(frozen=True)
class Assertion:
    """A verified passkey assertion: whose it is, and the RFC 8176 values it proved."""

    subject: str
    amr: list[str]


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def amr_of(synced: bool, user_verified: bool) -> list[str]:
    """RFC 8176 §2 values for one passkey assertion: the key's proof of possession ("swk" for a synced passkey,
    whose private key leaves the device; "hwk" for one bound to its authenticator), the user presence test every
    assertion carries ("user"), and "mfa" when the authenticator verified the user (PIN or biometric: a multi-factor
    cryptographic authenticator, NIST SP 800-63B §5.1.9)."""
    return ["swk" if synced else "hwk", "user", *(["mfa"] if user_verified else [])]


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def _binding(purpose: str, value: str) -> bytes:
    return _digest(f"iam passkey {purpose}:{value}".encode())


def _passkey(row) -> Passkey:
    return Passkey(id=row.id, name=row.name, created_at=row.created_at, last_used_at=row.last_used_at,
                   synced=row.backup_eligible)


def clean_name(name: str) -> str:
    """A passkey's name as the person typed it: printable, at most NAME_LENGTH characters, never empty."""
    printable = " ".join("".join(ch for ch in name if ch.isprintable()).split())[:NAME_LENGTH]
    return printable or "Passkey"


class Passkeys:
    def __init__(self, store: AuthnStore, issuer: str, login_base: str, clock=time.time) -> None:
        self.store = store
        self.clock = clock
        # The RP ID is the issuer's host (WebAuthn §5.1.4.1: a passkey works on that host and its subdomains);
        # the origins are where the ceremonies may run: the issuer's, and the sign-in pages' when they differ.
        self.rp_id = urlsplit(issuer).hostname or ""
        self.origins = sorted({origin_of(issuer), origin_of(login_base)})
        pages = urlsplit(login_base).hostname or ""
        if pages != self.rp_id and not pages.endswith("." + self.rp_id):
            log.warning("passkeys cannot work: the sign-in pages' host %s is neither the issuer's host %s (the RP ID) "
                        "nor a subdomain of it (WebAuthn §5.1.4.1)", pages, self.rp_id)

    async def registered(self, subject: str) -> bool:
        return await self.store.count_passkeys(subject) > 0

    async def of(self, subject: str) -> list[Passkey]:
        return [_passkey(row) for row in await self.store.passkeys_of(subject)]

    async def _challenge(self, purpose: str, binding: str, subject: str | None) -> bytes:
        challenge = secrets.token_bytes(32)
        await self.store.add_passkey_challenge(_digest(challenge), purpose=purpose, subject=subject,
                                               binding=_binding(purpose, binding),
                                               expires_at=int(self.clock()) + CHALLENGE_TTL)
        return challenge

    async def _take_challenge(self, client_data_json: bytes, purpose: str, binding: str,
                              subject: str | None) -> bytes:
        """The challenge the browser answered, spent by this call: only if this server issued it for this purpose,
        to this session or sign-in, and it is unexpired."""
        try:
            challenge = parse_client_data_json(client_data_json).challenge
        except (WebAuthnException, ValueError, KeyError, TypeError, AttributeError):
            raise PasskeyRejected("malformed_client_data") from None
        row = await self.store.take_passkey_challenge(_digest(challenge))
        if (row is None or row.purpose != purpose or row.expires_at <= self.clock() or row.subject != subject
                or not constant_time_equal(row.binding.hex(), _binding(purpose, binding).hex())):
            raise PasskeyRejected("unknown_challenge")
        return challenge

    # -- registration ----------------------------------------------------------------------------------------------
    async def registration_options(self, subject: str, user_name: str, display_name: str, session: str) -> str:
        """The options for navigator.credentials.create() (JSON), for a passkey of `subject`, bound to the SSO
        session `session` (its sid). The caller re-authenticated the person first."""
        existing = await self.store.passkeys_of(subject)
        if len(existing) >= MAX_PASSKEYS:
            raise PasskeyRejected("too_many_passkeys")
        options = generate_registration_options(
            rp_id=self.rp_id, rp_name=RP_NAME, user_id=subject.encode(), user_name=user_name,
            user_display_name=display_name, challenge=await self._challenge(REGISTER, session, subject),
            timeout=CHALLENGE_TTL * 1000, attestation=AttestationConveyancePreference.NONE,
            # A passkey: discoverable (signs in without a username), verifying the user (WebAuthn §6.2.3).
            authenticator_selection=AuthenticatorSelectionCriteria(
                resident_key=ResidentKeyRequirement.REQUIRED, require_resident_key=True,
                user_verification=UserVerificationRequirement.REQUIRED),
            exclude_credentials=[_descriptor(row) for row in existing],  # one passkey per authenticator
            supported_pub_key_algs=ALGORITHMS)
        return options_to_json(options)

    async def register(self, subject: str, session: str, response: str, name: str) -> Passkey:
        """Verify the browser's answer to the options of `registration_options` and store the passkey."""
        if len(response) > RESPONSE_LENGTH:
            raise PasskeyRejected("malformed_response")
        try:
            credential = parse_registration_credential_json(response)
        except (WebAuthnException, ValueError, KeyError, TypeError, AttributeError):
            raise PasskeyRejected("malformed_response") from None
        challenge = await self._take_challenge(credential.response.client_data_json, REGISTER, session, subject)
        try:
            verified = verify_registration_response(
                credential=credential, expected_challenge=challenge, expected_rp_id=self.rp_id,
                expected_origin=self.origins, require_user_verification=True, supported_pub_key_algs=ALGORITHMS)
        except (WebAuthnException, ValueError, KeyError, TypeError) as exc:
            raise PasskeyRejected(f"invalid_registration: {exc}") from None
        if await self.store.count_passkeys(subject) >= MAX_PASSKEYS:
            raise PasskeyRejected("too_many_passkeys")
        now = int(self.clock())
        passkey = Passkey(id=secrets.token_urlsafe(16), name=clean_name(name), created_at=now, last_used_at=None,
                          synced=verified.credential_device_type == CredentialDeviceType.MULTI_DEVICE)
        transports = [t.value for t in credential.response.transports or [] if isinstance(t, AuthenticatorTransport)]
        if not await self.store.add_passkey(
                id=passkey.id, subject=subject, credential_id=verified.credential_id,
                public_key=verified.credential_public_key, sign_count=verified.sign_count,
                backup_eligible=passkey.synced, backup_state=verified.credential_backed_up,
                transports=" ".join(transports)[:255], name=passkey.name, created_at=now, last_used_at=None):
            raise PasskeyRejected("already_registered")
        return passkey

    async def rename(self, subject: str, passkey_id: str, name: str) -> bool:
        return await self.store.rename_passkey(subject, passkey_id[:32], clean_name(name))

    async def remove(self, subject: str, passkey_id: str) -> bool:
        return await self.store.remove_passkey(subject, passkey_id[:32])

    # -- sign-in -----------------------------------------------------------------------------------------------
    async def sign_in_options(self, browser: str, subject: str | None = None) -> str:
        """The options for navigator.credentials.get() (JSON), bound to this browser (`browser`: its CSRF cookie).
        Without `subject`: a passkey alone, any discoverable credential, the user verified. With it: the second
        step after a password, one of that person's passkeys (PasskeyRejected if they have none)."""
        if subject is None:
            purpose, allowed, verification = SIGN_IN, [], UserVerificationRequirement.REQUIRED
        else:
            purpose, verification = SECOND_FACTOR, UserVerificationRequirement.PREFERRED
            allowed = [_descriptor(row) for row in await self.store.passkeys_of(subject)]
            if not allowed:  # an empty list would let the browser offer any passkey (a discoverable sign-in)
                raise PasskeyRejected("no_passkey")
        options = generate_authentication_options(
            rp_id=self.rp_id, challenge=await self._challenge(purpose, browser, subject),
            timeout=CHALLENGE_TTL * 1000, allow_credentials=allowed, user_verification=verification)
        return options_to_json(options)

    async def authenticate(self, response: str, browser: str, subject: str | None = None) -> Assertion:
        """Verify the browser's answer to `sign_in_options` (the same `browser` and `subject`) and record the use
        (counter, backup state, time). A refusal changes nothing but spending the challenge."""
        if len(response) > RESPONSE_LENGTH:
            raise PasskeyRejected("malformed_response")
        try:
            credential = parse_authentication_credential_json(response)
        except (WebAuthnException, ValueError, KeyError, TypeError, AttributeError):
            raise PasskeyRejected("malformed_response") from None
        purpose = SIGN_IN if subject is None else SECOND_FACTOR
        challenge = await self._take_challenge(credential.response.client_data_json, purpose, browser, subject)
        row = await self.store.passkey_by_credential_id(credential.raw_id)
        if row is None:
            raise PasskeyRejected("unknown_credential")  # never registered, or removed
        if subject is not None and row.subject != subject:
            raise PasskeyRejected("another_users_credential")
        # WebAuthn §7.2 step 6: the user handle, when the authenticator returns one, names the credential's owner.
        handle = credential.response.user_handle
        if handle is not None and not constant_time_equal(handle.hex(), row.subject.encode().hex()):
            raise PasskeyRejected("user_handle_mismatch")
        try:
            verified = verify_authentication_response(
                credential=credential, expected_challenge=challenge, expected_rp_id=self.rp_id,
                expected_origin=self.origins, credential_public_key=row.public_key,
                credential_current_sign_count=row.sign_count, require_user_verification=subject is None)
        except (WebAuthnException, ValueError, KeyError, TypeError) as exc:
            raise PasskeyRejected(f"invalid_assertion: {exc}") from None
        # WebAuthn L3 §7.2 step 19: backup eligibility is fixed at creation; a change means another authenticator.
        if (verified.credential_device_type == CredentialDeviceType.MULTI_DEVICE) != row.backup_eligible:
            raise PasskeyRejected("backup_eligibility_changed")
        if not await self.store.use_passkey(row.id, sign_count=row.sign_count, new_sign_count=verified.new_sign_count,
                                            backup_state=verified.credential_backed_up, now=int(self.clock())):
            raise PasskeyRejected("counter_raced")
        return Assertion(subject=row.subject, amr=amr_of(row.backup_eligible, verified.user_verified))

    async def purge_expired(self, now: int, batch: int) -> int:
        return await self.store.purge_passkey_challenges(now, batch)


def _descriptor(row) -> PublicKeyCredentialDescriptor:
    transports = [AuthenticatorTransport(t) for t in row.transports.split() if t in _TRANSPORTS]
    return PublicKeyCredentialDescriptor(id=row.credential_id, transports=transports or None)


_TRANSPORTS = {t.value for t in AuthenticatorTransport}
