"""OAuth error responses (RFC 6749 §5.2, RFC 6750 §3) in one place: no handler ever returns a stack trace."""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

log = logging.getLogger("iam.errors")

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
MAX_DESCRIPTION = 200


def description_text(text: str | None) -> str | None:
    """An error_description as RFC 6749 §5.2 allows it (%x20-21 / %x23-5B / %x5D-7E): anything else, which may
    come from the request (a parameter's name), becomes '?'. Also safe inside a quoted WWW-Authenticate value."""
    if text is None:
        return None
    return "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text[:MAX_DESCRIPTION])


class PeerUnavailable(Exception):
    """The other role did not answer; callers turn this into 503 / temporarily_unavailable."""


class PeerRejected(Exception):
    """The other role refused the call (the message says why)."""


class UserDisabled(Exception):
    """An upstream sign-in for a user disabled in iam's directory (SCIM): the sign-in fails."""


class PasswordRejected(ValueError):
    """The password does not meet the policy (the message says which rule)."""


class OAuthError(Exception):
    """An error the client can act on. `status` follows RFC 6749 §5.2 unless the endpoint's RFC says otherwise."""

    def __init__(
        self, error: str, description: str | None = None, status: int = 400, headers: dict | None = None
    ) -> None:
        super().__init__(description or error)
        self.error = error
        self.description = description_text(description)
        self.status = status
        self.headers = headers or {}

    def response(self) -> Response:
        body = {"error": self.error}
        if self.description:
            body["error_description"] = self.description
        return json_response(body, self.status, {**NO_STORE, **self.headers})


def invalid_client(description: str = "client authentication failed") -> OAuthError:
    # RFC 6749 §5.2: 401 with WWW-Authenticate naming the scheme the client can use.
    return OAuthError("invalid_client", description, 401, {"WWW-Authenticate": 'Basic realm="iam"'})


def invalid_token(description: str | None = None) -> OAuthError:
    # RFC 6750 §3: a bad bearer token is 401 with the error in WWW-Authenticate.
    challenge = 'Bearer realm="iam"'
    if description is not None:
        challenge += f', error="invalid_token", error_description="{description_text(description)}"'
    return OAuthError("invalid_token", description, 401, {"WWW-Authenticate": challenge})


def invalid_grant(description: str) -> OAuthError:
    # RFC 6749 §5.2: a code, refresh token or device code that is not (or no longer) good.
    return OAuthError("invalid_grant", description)


def insufficient_scope(scope: str, description: str) -> OAuthError:
    # RFC 6750 §3.1: 403, naming the scope the call needs.
    challenge = f'Bearer realm="iam", error="insufficient_scope", scope="{scope}"'
    return OAuthError("insufficient_scope", description, 403, {"WWW-Authenticate": challenge})


def json_response(body: object, status: int = 200, headers: dict | None = None) -> Response:
    return Response(
        json.dumps(body, separators=(",", ":")).encode(), status, headers, media_type="application/json"
    )


def temporarily_unavailable() -> Response:
    # A store outage is never the client's fault: no invalid_client / invalid_grant, nothing consumed.
    return OAuthError(
        "temporarily_unavailable",
        "a store or service this request needs is unavailable; retry later",
        503,
        {"Retry-After": "1"},
    ).response()


def _methods_served(request: Request) -> list[str]:
    """Every method some route serves at this path (RFC 9110 §15.5.6), not only the first matching route's."""
    methods: set[str] = set()
    for route in _routes(request.app.router.routes):
        if getattr(route, "methods", None) and route.matches(request.scope)[0] is not Match.NONE:
            methods |= route.methods
    return sorted(methods)


def _routes(routes):
    for route in routes:
        included = getattr(route, "original_router", None)  # FastAPI keeps an included router as one entry
        yield from _routes(included.routes) if included is not None else (route,)


def install(app: FastAPI) -> None:
    @app.exception_handler(OAuthError)
    async def _oauth(_: Request, exc: OAuthError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        return OAuthError("invalid_request", "malformed request").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        error = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": ", ".join(_methods_served(request))}
        return json_response({"error": error}, exc.status_code, headers)

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, _: ClientDisconnect) -> Response:
        # The client went away mid-upload: nothing failed here, and no one reads the answer. 499 (nginx's "client
        # closed request") keeps it out of the 5xx error rate.
        log.info("client disconnected before its request was read", extra={"path": request.url.path})
        return Response(status_code=499)

    @app.exception_handler(PeerUnavailable)
    @app.exception_handler(PeerRejected)
    async def _peer(_: Request, exc: Exception) -> Response:
        log.error("peer call failed: %s", exc)
        return temporarily_unavailable()

    @app.exception_handler(DBAPIError)
    @app.exception_handler(PoolTimeout)  # no pooled connection came free in time
    @app.exception_handler(OSError)
    @app.exception_handler(TimeoutError)
    async def _store_down(request: Request, exc: Exception) -> Response:
        if isinstance(exc, IntegrityError | ProgrammingError | DataError):
            return await _unexpected(request, exc)  # our bug, not an outage
        log.warning("store unavailable: %s", exc.__class__.__name__)
        return temporarily_unavailable()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error")
        return OAuthError("server_error", "unexpected error", 500).response()
