"""A software WebAuthn authenticator and client for the tests: what a browser and a passkey provider send.

It builds the answers of navigator.credentials.create() and .get() in their JSON form (WebAuthn L3 §5.1.10,
RegistrationResponseJSON / AuthenticationResponseJSON) with ES256 keys (`cryptography`) and CBOR (`cbor2`), so a
test can answer with the wrong origin, RP ID, challenge or counter. The server reads them with py_webauthn.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from dataclasses import dataclass

import cbor2
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

UP, UV, BE, BS, AT = 0x01, 0x04, 0x08, 0x10, 0x40  # authenticator data flags (WebAuthn §6.1)
AAGUID = bytes(16)  # "none" attestation: no model is claimed


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Credential:
    id: bytes
    key: ec.EllipticCurvePrivateKey
    user_handle: bytes
    rp_id: str
    sign_count: int = 0


class SoftAuthenticator:
    """One authenticator with its discoverable credentials. `counter`: whether it keeps a signature counter (a
    synced passkey usually sends 0); `backup_eligible` / `backed_up`: the BE and BS flags; `verifies_user`: UV."""

    def __init__(self, origin: str, *, counter: bool = True, backup_eligible: bool = False, backed_up: bool = False,
                 verifies_user: bool = True) -> None:
        self.origin = origin
        self.counter = counter
        self.backup_eligible = backup_eligible
        self.backed_up = backed_up
        self.verifies_user = verifies_user
        self.credentials: list[Credential] = []

    def _flags(self) -> int:
        return (UP | (UV if self.verifies_user else 0) | (BE if self.backup_eligible else 0)
                | (BS if self.backed_up else 0))

    @staticmethod
    def _client_data(kind: str, challenge: str, origin: str) -> bytes:
        return json.dumps({"type": kind, "challenge": challenge, "origin": origin, "crossOrigin": False}).encode()

    def create(self, options: dict, *, origin: str | None = None, rp_id: str | None = None,
               challenge: str | None = None, credential_id: bytes | None = None) -> dict:
        """navigator.credentials.create({publicKey: options}), as JSON; the keyword arguments forge its parts."""
        rp = rp_id or options["rp"]["id"]
        assert -7 in [p["alg"] for p in options["pubKeyCredParams"]], "ES256 must be offered"
        key = ec.generate_private_key(ec.SECP256R1())
        numbers = key.public_key().public_numbers()
        cose = cbor2.dumps({1: 2, 3: -7, -1: 1, -2: numbers.x.to_bytes(32, "big"), -3: numbers.y.to_bytes(32, "big")})
        credential = Credential(credential_id or secrets.token_bytes(16), key, unb64url(options["user"]["id"]), rp)
        auth_data = (hashlib.sha256(rp.encode()).digest() + bytes([self._flags() | AT])
                     + credential.sign_count.to_bytes(4, "big") + AAGUID + len(credential.id).to_bytes(2, "big")
                     + credential.id + cose)
        self.credentials.append(credential)
        client_data = self._client_data("webauthn.create", challenge or options["challenge"], origin or self.origin)
        return {"id": b64url(credential.id), "rawId": b64url(credential.id), "type": "public-key",
                "authenticatorAttachment": "platform", "clientExtensionResults": {},
                "response": {"clientDataJSON": b64url(client_data),
                             "attestationObject": b64url(cbor2.dumps({"fmt": "none", "attStmt": {},
                                                                      "authData": auth_data})),
                             "transports": ["internal", "hybrid"]}}

    def get(self, options: dict, *, credential: Credential | None = None, origin: str | None = None,
            rp_id: str | None = None, challenge: str | None = None, sign_count: int | None = None,
            user_handle: bytes | None = None) -> dict:
        """navigator.credentials.get({publicKey: options}), as JSON: with the newest credential (or one of those
        allowed, or `credential`); the keyword arguments forge its parts."""
        allowed = [unb64url(c["id"]) for c in options.get("allowCredentials") or []]
        chosen = credential or next(c for c in reversed(self.credentials) if not allowed or c.id in allowed)
        if sign_count is not None:
            chosen.sign_count = sign_count
        elif self.counter:
            chosen.sign_count += 1
        auth_data = (hashlib.sha256((rp_id or chosen.rp_id).encode()).digest() + bytes([self._flags()])
                     + chosen.sign_count.to_bytes(4, "big"))
        client_data = self._client_data("webauthn.get", challenge or options["challenge"], origin or self.origin)
        signature = chosen.key.sign(auth_data + hashlib.sha256(client_data).digest(), ec.ECDSA(hashes.SHA256()))
        return {"id": b64url(chosen.id), "rawId": b64url(chosen.id), "type": "public-key",
                "authenticatorAttachment": "platform", "clientExtensionResults": {},
                "response": {"clientDataJSON": b64url(client_data), "authenticatorData": b64url(auth_data),
                             "signature": b64url(signature), "userHandle": b64url(user_handle or chosen.user_handle)}}
