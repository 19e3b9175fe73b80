"""Request parsing shared by the OAuth endpoints: strict, bounded, and never a 500 on bad input."""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from fastapi import Request, Response
from starlette.routing import BaseRoute, Match, NoMatchFound, Route

from iam.errors import OAuthError

MAX_FORM_BYTES = 16 * 1024
MAX_JSON_BYTES = 64 * 1024
MAX_VALUE_CHARS = 4096
FORM_TYPE = "application/x-www-form-urlencoded"
JSON_TYPES = ("application/json",)
# The `token` of introspection and revocation is whatever a resource server or client holds, often a long JWT
# of another issuer: RFC 7662 §2.2 answers it `active: false` and RFC 7009 §2.2 200, never a 400.
TOKEN_PARAMETER = frozenset({"token"})


def is_digits(text: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²' or '٣', which int() then refuses or reads."""
    return text.isascii() and text.isdigit()


async def read_form(request: Request, long_values: frozenset[str] = frozenset()) -> dict[str, str]:
    """Parse an `application/x-www-form-urlencoded` body (RFC 6749 §3.2, §4.1.3).

    Parameters sent more than once are refused (RFC 6749 §3.1); so are bodies and values over the limits. The
    parameters named in `long_values` are bounded by the body limit alone (see TOKEN_PARAMETER).
    """
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != FORM_TYPE:
        raise OAuthError("invalid_request", f"the request body must be {FORM_TYPE}")
    declared = request.headers.get("content-length")
    if declared is not None and (not is_digits(declared) or int(declared) > MAX_FORM_BYTES):
        raise OAuthError("invalid_request", "request body too large", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise OAuthError("invalid_request", "request body too large", 413)
    try:
        return parse_params(body.decode(), long_values)
    except UnicodeDecodeError:
        raise OAuthError("invalid_request", "malformed form body") from None


async def read_json(request: Request, types: tuple[str, ...] = JSON_TYPES, error: str = "invalid_request", *,
                    optional: bool = False) -> Any:
    """A JSON body of one of the media `types` (415 for another), of at most MAX_JSON_BYTES (413); `error` (with
    400) if it is not JSON. An empty body is `{}`; with `optional`, so is a request without a body, whatever its
    Content-Type."""
    if optional and request.headers.get("content-length", "0") == "0":
        return {}
    media_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    if media_type not in types:
        raise OAuthError("invalid_request", f"the body must be {' or '.join(types)}", status=415)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise OAuthError("invalid_request", f"the body may have at most {MAX_JSON_BYTES} bytes", status=413)
    try:
        return json.loads(body.decode("utf-8")) if body else {}
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise OAuthError(error, "the body is not valid JSON") from None


async def read_params(request: Request) -> dict[str, str]:
    """The parameters of a browser-facing endpoint that takes GET (query) or POST (form), e.g. OIDC Core §3.1.2.1."""
    return await read_form(request) if request.method == "POST" else parse_params(request.url.query)


def parse_params(encoded: str, long_values: frozenset[str] = frozenset()) -> dict[str, str]:
    """Parse urlencoded parameters, refusing repeats (RFC 6749 §3.1) and values over the limit."""
    if len(encoded) > MAX_FORM_BYTES:
        raise OAuthError("invalid_request", "request too large", 413)
    try:
        pairs = parse_qsl(encoded, keep_blank_values=True, strict_parsing=bool(encoded), errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "malformed parameters") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise OAuthError("invalid_request", f"parameter {name} sent more than once")
        if len(value) > MAX_VALUE_CHARS and name not in long_values:
            raise OAuthError("invalid_request", f"parameter {name} is too long")
        if value:  # RFC 6749 §3.1: parameters sent without a value are treated as omitted
            form[name] = value
    return form


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer` header (RFC 6750 §2.1), or None."""
    presented = access_token(request)
    return presented[1] if presented is not None and presented[0] == "bearer" else None


def access_token(request: Request) -> tuple[str, str] | None:
    """The scheme (`bearer`, RFC 6750 §2.1, or `dpop`, RFC 9449 §7.1) and token of the Authorization header."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    scheme = scheme.lower()
    if scheme not in ("bearer", "dpop") or not token:
        return None
    return scheme, token


def client_address(request: Request, trusted_proxies: list[str]) -> str:
    """The caller's address; X-Forwarded-For counts only when the peer is a configured proxy (RFC 9700 §4.13)."""
    peer = request.client.host if request.client else "unknown"
    forwarded = request.headers.get("x-forwarded-for")
    if not forwarded or not trusted_proxies:
        return peer
    try:
        if not any(ipaddress.ip_address(peer) in ipaddress.ip_network(net, strict=False) for net in trusted_proxies):
            return peer
    except ValueError:
        return peer
    # The right-most address not added by one of our proxies is the client.
    for hop in reversed([part.strip() for part in forwarded.split(",")]):
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return peer
        if not any(address in ipaddress.ip_network(net, strict=False) for net in trusted_proxies):
            return str(address)
    return peer


def with_params(uri: str, params: Mapping[str, str | None]) -> str:
    """Add response parameters to a redirect URI, keeping the query it was registered with (RFC 6749 §3.1.2)."""
    query = urlencode({k: v for k, v in params.items() if v is not None})
    return f"{uri}{'&' if urlsplit(uri).query else '?'}{query}"


class PlainRoute(Route):
    """A route without FastAPI's per-request machinery (body inspection, dependency solving), for the hot
    endpoints (introspection, forward-auth) whose handlers take the Request and nothing else. Errors go to the
    app's exception handlers as for any route; like FastAPI's routes it puts itself in scope["route"], so
    metrics are labelled with its path template.
    """

    def matches(self, scope):
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope



class PlainRoutes(BaseRoute):
    """The plain routes, mounted first, found by their exact path with one dict lookup (a path with parameters
    is tried after that): the hot endpoints skip the route-by-route matching of everything mounted before them,
    and every other request pays one lookup. Walkers of the app's routes see them through `original_router`,
    as FastAPI shows an included router."""

    def __init__(self, routes: list[PlainRoute]) -> None:
        self.routes = routes
        self.original_router = self
        self._exact: dict[str, list[PlainRoute]] = {}
        self._patterns: list[PlainRoute] = []
        for route in routes:
            if route.param_convertors:
                self._patterns.append(route)
            else:
                self._exact.setdefault(route.path, []).append(route)

    def matches(self, scope):
        if scope["type"] != "http":
            return Match.NONE, {}
        partial = None
        for route in (*self._exact.get(scope["path"], ()), *self._patterns):
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                return match, child_scope
            if match is Match.PARTIAL and partial is None:
                partial = child_scope  # the path, not the method: 405 unless a later route serves it
        return (Match.NONE, {}) if partial is None else (Match.PARTIAL, partial)

    async def handle(self, scope, receive, send) -> None:
        await scope["route"].handle(scope, receive, send)  # the route that matched (PlainRoute.matches)

    def url_path_for(self, name: str, /, **path_params):
        for route in self.routes:
            try:
                return route.url_path_for(name, **path_params)
            except NoMatchFound:
                pass
        raise NoMatchFound(name, path_params)

class HotLane:
    """ASGI, in front of the app's own middleware: a request for one of the plain routes' exact paths, with a method
    that route serves, goes straight to its handler; every other request goes through the app, where the same
    routes are mounted too (a path with parameters still matches there, a wrong method still gets its 405).

    FastAPI's middleware and routing took about a sixth of a cache-miss introspection's time and do nothing for
    these routes: their handlers take the Request alone, bound and parse their own bodies, and raise errors that
    go to the app's exception handlers, looked up here as Starlette does (the most specific class first)."""

    def __init__(self, app, routes: PlainRoutes, handlers: Mapping[Any, Callable[[Request, Exception], Any]]) -> None:
        self.app = app
        self._handlers = handlers
        self._routes: dict[str, dict[str, PlainRoute]] = {}
        for path, same_path in routes._exact.items():
            for route in reversed(same_path):  # the first route mounted for a method wins, as in the router
                self._routes.setdefault(path, {}).update(dict.fromkeys(route.methods or (), route))

    async def __call__(self, scope, receive, send) -> None:
        route = None
        if scope["type"] == "http" and (by_method := self._routes.get(scope["path"])) is not None:
            route = by_method.get(scope["method"])
        if route is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = route  # what the metrics are labelled with, as PlainRoute.matches does
        scope["path_params"] = {}
        request = Request(scope, receive, send)
        try:
            response = await route.endpoint(request)
        except Exception as exc:
            response = await self._handled(request, exc)
        await response(scope, receive, send)

    async def _handled(self, request: Request, exc: Exception) -> Response:
        for cls in type(exc).__mro__:
            handler = self._handlers.get(cls)
            if handler is not None:
                response: Response = await handler(request, exc)
                return response
        raise exc


# RFC 9110 §8.8.3: entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE, etagc = %x21 / %x23-7E / obs-text
_ENTITY_TAG = re.compile(r'\s*(?:W/)?("[\x21\x23-\x7e\x80-\xff]*")\s*(?:,|$)')


def none_match(header: str, etag: str) -> bool:
    """Whether an `If-None-Match` field value matches `etag` (RFC 9110 §13.1.2): `*`, or a list of entity-tags of
    which one is weakly equal (the opaque tags alike, W/ or not). A malformed value matches nothing."""
    header = header.strip()
    if header == "*":
        return True
    position, tags = 0, []
    while position < len(header):
        found = _ENTITY_TAG.match(header, position)
        if found is None:
            return False
        tags.append(found.group(1))
        position = found.end()
    return etag.removeprefix("W/") in tags


class _Prebuilt(Response):
    """A response whose status, headers and body were all built beforehand."""

    def __init__(self, status: int, raw_headers: list[tuple[bytes, bytes]], body: bytes = b"") -> None:
        self.status_code, self.raw_headers, self.body, self.background = status, raw_headers, body, None


class StaticDocument:
    """A document that changes only when the server's configuration or keys do (discovery, JWKS): its bytes, a
    strong `ETag` (a digest of them) and `Cache-Control`, built once; a conditional GET whose `If-None-Match`
    matches gets `304` with the same validator and caching headers, and no body (RFC 9110 §13.1.2, §15.4.5)."""

    def __init__(self, body: bytes, media_type: str, cache_control: str) -> None:
        self.body = body
        self.etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
        validators = [(b"etag", self.etag.encode()), (b"cache-control", cache_control.encode())]
        self._ok = _Prebuilt(200, [(b"content-type", media_type.encode()),
                                   (b"content-length", str(len(body)).encode()), *validators], body)
        self._not_modified = _Prebuilt(304, validators)

    def response(self, request: Request) -> Response:
        header = request.headers.get("if-none-match")
        return self._not_modified if header is not None and none_match(header, self.etag) else self._ok
