"""Redirect URI rules: exact match (RFC 9700 §4.1.3), any port on a loopback for native apps (RFC 8252 §7.3)."""

from __future__ import annotations

import re

from iam.config import ClientConfig

# http://<loopback host>[:<port>]<rest>, as written: the port is the only part allowed to differ (RFC 8252 §7.3);
# scheme and host are compared exactly, like the rest of the URI (RFC 9700 §4.1.3), never case-folded.
_LOOPBACK = re.compile(r"http://(127\.0\.0\.1|\[::1\]|localhost)(?::([0-9]{1,5}))?([/?#].*)?", re.DOTALL)


def _without_port(uri: str) -> tuple[str, str] | None:
    match = _LOOPBACK.fullmatch(uri)
    if match is None or (match[2] is not None and int(match[2]) > 65535):
        return None
    return match[1], match[3] or ""


def redirect_uri_allowed(client: ClientConfig, uri: str) -> bool:
    if uri in client.redirect_uris:  # simple string comparison, RFC 3986 §6.2.1
        return True
    if client.application_type != "native":
        return False
    presented = _without_port(uri)
    return presented is not None and any(presented == _without_port(known) for known in client.redirect_uris)
