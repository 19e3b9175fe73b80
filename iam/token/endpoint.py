"""The token endpoint (RFC 6749 §3.2): authenticate the client, then hand over to the grant's module."""

import functools

from fastapi import Request, Response
from prometheus_client import Counter

from iam.config import EXCHANGE_GRANT, ClientConfig
from iam.errors import NO_STORE, OAuthError, json_response
from iam.http import PlainRoute, read_form
from iam.observability import TOKENS_ISSUED, audit, source_of
from iam.token.clients import authenticate
from iam.token.device_codes import DEVICE_GRANT
from iam.token.dpop import InvalidProof
from iam.token.grants import authorization_code, client_credentials, device_code, refresh_token, token_exchange
from iam.token.holders import Holder, certificate, dpop_key
from iam.token.services import TokenServices, token_services

GRANTS = {
    "authorization_code": authorization_code.grant,
    "client_credentials": client_credentials.grant,
    "refresh_token": refresh_token.grant,
    DEVICE_GRANT: device_code.grant,
    EXCHANGE_GRANT: token_exchange.grant,
}


@functools.cache  # the configured grants and clients: a bounded set of label values
def _issued(grant_type: str, client_id: str) -> Counter:
    return TOKENS_ISSUED.labels(grant_type, client_id)


async def token(request: Request) -> Response:
    services = token_services(request)
    form = await read_form(request)
    client = await authenticate(request, services.clients, form)
    grant_type = form.get("grant_type")
    if grant_type is None:
        raise OAuthError("invalid_request", "grant_type is required")
    handler = GRANTS.get(grant_type)
    if handler is None:
        raise OAuthError("unsupported_grant_type", "this server does not support that grant_type")
    if grant_type not in client.grant_types:
        raise OAuthError("unauthorized_client", "the client may not use this grant_type")
    holder = await _holder(request, services, client)
    body, subject = await handler(services, client, form, holder)
    _issued(grant_type, client.client_id).inc()
    audit("token.refreshed" if grant_type == "refresh_token" else "token.issued", actor=subject,
          client_id=client.client_id, source=source_of(request), grant_type=grant_type, scope=body.get("scope"))
    if holder is not None and holder.is_dpop and services.settings.dpop.require_nonce:
        return json_response(body, 200, {**NO_STORE, "DPoP-Nonce": services.dpop.nonces.current()})  # §8.2
    return json_response(body, 200, NO_STORE)


async def _holder(request: Request, services: TokenServices, client: ClientConfig) -> Holder | None:
    """Who the tokens issued are bound to: the client's TLS certificate if it is registered for certificate-bound
    tokens (RFC 8705 §3.1), else the key of a DPoP proof (RFC 9449 §5), else no one."""
    if client.tls_client_certificate_bound_access_tokens:
        if request.headers.get("dpop") is not None:
            raise OAuthError("invalid_request", "this client's tokens are bound to its TLS client certificate, "
                                                "not to a DPoP key")
        return certificate(services.certificates.bound(request))
    jkt = await _proof_key(request, services, client.dpop_bound_access_tokens)
    return None if jkt is None else dpop_key(jkt)


async def _proof_key(request: Request, services: TokenServices, required: bool) -> str | None:
    """The key of the request's DPoP proof (RFC 9449 §5), which the tokens issued are bound to; None without one."""
    proofs = request.headers.getlist("dpop")
    if not proofs:
        if required:
            raise OAuthError("invalid_dpop_proof", "this client's tokens require a DPoP proof")
        return None
    if len(proofs) > 1:  # §4.3 item 1: exactly one
        raise OAuthError("invalid_dpop_proof", "more than one DPoP header")
    try:
        # htu: the token endpoint's public URL, never built from the Host header the caller chooses.
        return (await services.dpop.verify(proofs[0], "POST", services.token_endpoint)).jkt
    except InvalidProof as exc:
        raise services.dpop.error(exc, resource=False) from None


# A plain route, mounted on the app itself (iam/app.py): issuance skips FastAPI's per-request machinery.
routes = [PlainRoute("/oauth/v2/token", token, methods=["POST"], include_in_schema=False)]
