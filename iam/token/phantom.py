"""Forward-auth for stock ingress controllers (contract: `GET /oauth/v2/phantom`).

`Authorization: Bearer <opaque>` in, `200` with `Authorization: Bearer <jwt>` out, or `401` with
`WWW-Authenticate` (RFC 6750 §3). nginx `auth_request` / ingress-nginx `auth-url`, Traefik ForwardAuth and
Envoy ext_authz (which appends the original path) all call it as they are, with any method.
Serve it inside the cluster only: it hands the JWT to whoever holds the opaque token.

`GET /oauth/v2/phantom?audience=<aud>` also requires the token to be meant for that API (its JWT's `aud`
contains it; ASVS 5 V10.3.1): the ingress names each route's audience in its fixed auth URL. The parameter is
read on this exact path only; under `/oauth/v2/phantom/...` (Envoy appends the caller's path and query) it
would be the caller's to choose.

DPoP (RFC 9449 §7): a token bound to a key passes only as `Authorization: DPoP <opaque>` with a `DPoP` proof
of that key for the API call itself, whose method and URL the ingress forwards (`dpop.original_request_headers`:
X-Original-Method / X-Original-URL, or X-Forwarded-Method / -Proto / -Host / -Uri); the ingress must set these
itself, never pass on the caller's. mTLS (RFC 8705 §3): a token bound to a certificate passes only with that
certificate, in the header the ingress sets from its TLS handshake (`mtls.certificate_header`, from
`mtls.trusted_proxies`). A bearer token is recognised by its cached row: no new work for it.
"""

from urllib.parse import parse_qs

from fastapi import Request, Response

from iam.errors import OAuthError, invalid_token
from iam.http import PlainRoute, access_token
from iam.observability import INTROSPECTIONS
from iam.token.holders import Holder
from iam.token.senders import check_sender
from iam.token.services import TokenServices, token_services

ACTIVE = INTROSPECTIONS.labels("phantom", "active")
INACTIVE = INTROSPECTIONS.labels("phantom", "inactive")
WRONG_AUDIENCE = INTROSPECTIONS.labels("phantom", "wrong_audience")
UNPROVEN = INTROSPECTIONS.labels("phantom", "unproven_holder")
_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


async def phantom(request: Request) -> Response:
    presented = access_token(request)
    if presented is None:
        INACTIVE.inc()
        return invalid_token().response()
    scheme, token = presented
    services = token_services(request)
    live = await services.access_tokens.live(token)
    if live is None:
        INACTIVE.inc()
        return invalid_token("the access token is invalid, expired or revoked").response()
    holder = live.holder
    if holder is not None or scheme == "dpop":
        try:
            await _check_sender(request, services, scheme, token, holder)
        except OAuthError as exc:
            UNPROVEN.inc()
            return exc.response()
    query = request.scope["query_string"]
    if query and request.scope["path"] == "/oauth/v2/phantom":
        wanted = parse_qs(query.decode("latin-1")).get("audience")
        if wanted and not live.audiences.issuperset(wanted):
            WRONG_AUDIENCE.inc()
            return invalid_token("the access token is not meant for this API").response()
    ACTIVE.inc()
    return Response(status_code=200, headers={"Authorization": f"Bearer {live.jwt}", "Cache-Control": "no-store"})


async def _check_sender(request: Request, services: TokenServices, scheme: str, token: str,
                        holder: Holder | None) -> None:
    """RFC 9449 §7.1 or RFC 8705 §3 for the API call the ingress asks about."""
    headers = request.headers
    if services.settings.dpop.original_request_headers == "x-original":
        method, url = headers.get("x-original-method"), headers.get("x-original-url")
    else:
        method, proto, host, uri = (headers.get(f"x-forwarded-{name}") for name in ("method", "proto", "host", "uri"))
        url = f"{proto}://{host}{uri}" if proto and host and uri else None
    await check_sender(services, request, scheme, token, holder, method and method.upper(), url)


# Plain routes, mounted on the app itself (iam/app.py): the hot path skips FastAPI's per-request machinery.
routes = [PlainRoute(path, phantom, methods=_METHODS, include_in_schema=False)
          for path in ("/oauth/v2/phantom", "/oauth/v2/phantom/{_path:path}")]
