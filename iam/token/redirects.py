"""Redirect URI rules: exact match (RFC 9700 §4.1.3), any port on a loopback for native apps (RFC 8252 §7.3)."""

from __future__ import annotations

from urllib.parse import urlsplit

from iam.config import LOOPBACK_HOSTS, ClientConfig


def _without_port(uri: str) -> tuple | None:
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return None
    if parts.scheme != "http" or parts.hostname not in LOOPBACK_HOSTS or "@" in parts.netloc:
        return None
    return (parts.scheme, parts.hostname, parts.path, parts.query, parts.fragment)


def redirect_uri_allowed(client: ClientConfig, uri: str) -> bool:
    if uri in client.redirect_uris:  # simple string comparison, RFC 3986 §6.2.1
        return True
    if client.application_type != "native":
        return False
    presented = _without_port(uri)
    return presented is not None and any(presented == _without_port(known) for known in client.redirect_uris)
