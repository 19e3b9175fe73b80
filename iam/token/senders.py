"""Sender-constrained access tokens at a protected resource (forward-auth, userinfo): a token bound to a holder
passes only with the holder's proof, a DPoP proof of its key (RFC 9449 §7.1) or its TLS client certificate
(RFC 8705 §3); a bearer token passes as it is."""

from starlette.requests import Request

from iam.token.dpop import resource_error
from iam.token.holders import Holder
from iam.token.services import TokenServices


async def check_sender(services: TokenServices, request: Request, scheme: str, token: str, holder: Holder | None,
                       method: str | None, url: str | None) -> None:
    """OAuthError (401) unless the request proves it comes from the token's holder. `method` and `url`: the API
    call a DPoP proof is for (None if not known)."""
    if holder is not None and not holder.is_dpop:
        if scheme == "dpop":
            raise resource_error("the access token is not bound to a DPoP key", services.dpop.nonces,
                                 "invalid_token")
        services.certificates.check_presented(request, holder.thumbprint)
        return
    jkt = None if holder is None else holder.thumbprint
    await services.dpop.check_presented(scheme, token, jkt, request.headers.getlist("dpop"), method, url)
