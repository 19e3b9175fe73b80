"""Authorization server metadata (RFC 8414, OpenID Connect Discovery 1.0) and the JWKS.

Both change only with the configuration or the key ring: prebuilt bytes with a strong `ETag` and
`Cache-Control` (iam.token.metadata.Documents), rebuilt when the key ring changes,
served from plain routes like the hot paths.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from fastapi import Request, Response

from iam.http import PlainRoute
from iam.token.services import token_services


async def discovery(request: Request) -> Response:
    return token_services(request).documents.current().metadata.response(request)


async def jwks(request: Request) -> Response:
    return token_services(request).documents.current().jwks.response(request)


def _document(path: str, endpoint: Callable[[Request], Awaitable[Response]]) -> PlainRoute:
    return PlainRoute(path, endpoint, methods=["GET"], include_in_schema=False)


# Plain routes, mounted on the app itself (iam/app.py) with the hot paths.
routes = [_document("/.well-known/oauth-authorization-server", discovery),
          _document("/.well-known/openid-configuration", discovery),
          _document("/oauth/v2/jwks", jwks)]
