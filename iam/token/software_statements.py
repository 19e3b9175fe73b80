"""Software statements (RFC 7591 §2.3, §3.1.1): a JWT in which a trusted issuer vouches for client metadata.

A statement counts only if its `iss` is one of `registration.software_statement_issuers` and its signature
verifies with that issuer's keys (RS256, ES256 or EdDSA: never `none`, never a shared-secret algorithm, which a
public key could be passed off as). Its claims then are client metadata that take precedence over the same
members sent in plain JSON (§3.1.1); the registration endpoint's allow-list and policy apply to the result.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jws import extract_compact

from iam.config import Registration, SoftwareStatementIssuer
from iam.errors import OAuthError
from iam.jwks import KeySources, KeysUnavailable, public_keys
from iam.token.client_assertions import KeySource, StaticKeys
from iam.token.client_metadata import ClientMetadataError

log = logging.getLogger("iam.token.software_statements")

STATEMENT_ALGS = ("RS256", "ES256", "EdDSA")
MEMBER = "software_statement"


def _invalid(description: str) -> ClientMetadataError:
    return ClientMetadataError("invalid_software_statement", description)


class SoftwareStatements:
    def __init__(self, settings: Registration, key_sources: KeySources,
                 clock: Callable[[], float] = time.time) -> None:
        self._required = settings.software_statement_required
        self._issuers: dict[str, KeySource] = {issuer.issuer: self._keys(issuer, key_sources)
                                               for issuer in settings.software_statement_issuers}
        self._clock = clock

    @staticmethod
    def _keys(issuer: SoftwareStatementIssuer, key_sources: KeySources) -> KeySource:
        if issuer.jwks is not None:
            return StaticKeys(public_keys(issuer.jwks["keys"]))
        assert issuer.jwks_uri is not None  # the config has one of them
        return key_sources.jwks_uri(issuer.jwks_uri)

    async def apply(self, data: dict[str, Any]) -> dict[str, Any]:
        """`data` (client metadata) with its software statement's claims laid over it, the statement itself
        removed; ClientMetadataError (invalid_software_statement, unapproved_software_statement) if it does not
        hold, or if one is required and there is none."""
        data = dict(data)
        statement = data.pop(MEMBER, None)
        if statement is None:
            if self._required:
                raise _invalid("a software_statement is required")
            return data
        return {**data, **await self._claims(statement)}

    async def _claims(self, statement: Any) -> dict[str, Any]:
        if not isinstance(statement, str):
            raise _invalid("the software_statement is not a JWT")
        try:
            signed = extract_compact(statement.encode())
            header, unverified = signed.headers(), json.loads(signed.payload)
        except (JoseError, ValueError, UnicodeError):
            raise _invalid("the software_statement is not a JWT") from None
        alg = header.get("alg")
        if alg not in STATEMENT_ALGS or "crit" in header:
            raise _invalid("the software_statement's alg is not one of " + ", ".join(STATEMENT_ALGS))
        issuer = unverified.get("iss") if isinstance(unverified, dict) else None
        keys = self._issuers.get(issuer) if isinstance(issuer, str) else None
        if keys is None:
            raise ClientMetadataError("unapproved_software_statement", "the software_statement's issuer is not trusted")
        try:
            key = await keys.key(header.get("kid"), alg)
            claims = None if key is None else jwt.decode(statement, key, algorithms=[alg]).claims
        except KeysUnavailable as exc:  # not the registrant's fault: its statement may well hold
            log.warning("software statement keys unavailable: %s", exc)
            raise OAuthError("temporarily_unavailable", "the keys to verify the software_statement are unavailable; "
                             "retry later", 503, {"Retry-After": "5"}) from None
        except (JoseError, ValueError):
            raise _invalid("the software_statement's signature does not verify") from None
        if claims is None:
            raise _invalid("the software_statement is signed by an unknown key")
        expires = claims.get("exp")
        if expires is not None and (isinstance(expires, bool) or not isinstance(expires, int | float)
                                    or expires <= self._clock()):
            raise _invalid("the software_statement has expired")
        return claims
