"""Request parsing shared by the OAuth endpoints: strict, bounded, and never a 500 on bad input."""

from __future__ import annotations

from urllib.parse import parse_qsl

from fastapi import Request

from iam.errors import OAuthError

MAX_FORM_BYTES = 16 * 1024
MAX_VALUE_CHARS = 4096
FORM_TYPE = "application/x-www-form-urlencoded"


async def read_form(request: Request) -> dict[str, str]:
    """Parse an `application/x-www-form-urlencoded` body (RFC 6749 §3.2, §4.1.3).

    Parameters sent more than once are refused (RFC 6749 §3.1); so are bodies and values over the limits.
    """
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != FORM_TYPE:
        raise OAuthError("invalid_request", f"the request body must be {FORM_TYPE}")
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > MAX_FORM_BYTES):
        raise OAuthError("invalid_request", "request body too large", 413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise OAuthError("invalid_request", "request body too large", 413)
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=bool(body), errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise OAuthError("invalid_request", "malformed form body") from None
    form: dict[str, str] = {}
    for name, value in pairs:
        if name in form:
            raise OAuthError("invalid_request", f"parameter {name} sent more than once")
        if len(value) > MAX_VALUE_CHARS:
            raise OAuthError("invalid_request", f"parameter {name} is too long")
        if value:  # RFC 6749 §3.1: parameters sent without a value are treated as omitted
            form[name] = value
    return form


def bearer_token(request: Request) -> str | None:
    """The token of an `Authorization: Bearer` header (RFC 6750 §2.1), or None."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token
