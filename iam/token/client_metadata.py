"""RFC 7591 client metadata (JSON) in, a validated `ClientConfig` out: the one place that does it, for the client
administration API, `iam clients` and dynamic registration alike.

The rules are `ClientConfig`'s, the very ones a client declared in the YAML config passes; only the errors are
told the RFC 7591 §3.2.2 way: `invalid_redirect_uri` for a redirect URI, `invalid_client_metadata` for anything
else, with the offending field's path in the description.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from iam.config import ClientConfig

# Fields whose errors are `invalid_redirect_uri` (RFC 7591 §3.2.2: "the value of one or more redirection URIs").
REDIRECT_FIELDS = frozenset({"redirect_uris", "post_logout_redirect_uris", "backchannel_logout_uri"})
# RFC 7591 §2: the server issues the secret. A caller naming one (or its hash) is refused, not ignored: a client
# that believes it chose its secret would authenticate with the wrong one.
ISSUED_BY_SERVER = frozenset({"client_secret", "client_secret_hash"})
# RFC 7591 §3.2.1 / RFC 7592 §3: response members the server sets; a client echoing them back is not wrong.
RESPONSE_ONLY = frozenset({"client_id_issued_at", "client_secret_expires_at", "registration_access_token",
                           "registration_client_uri"})


class ClientMetadataError(Exception):
    """Client metadata refused (RFC 7591 §3.2.2): `error` is invalid_client_metadata or invalid_redirect_uri."""

    def __init__(self, error: str, description: str) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description


def parse_client_metadata(data: dict[str, Any], *, client_id: str, ignore_unknown: bool = False) -> ClientConfig:
    """The `ClientConfig` for `client_id` that `data` (RFC 7591 metadata names) describes.

    A `client_id` in `data` must be `client_id`; the server-issued secret members are refused, and the response-only
    members are ignored. Unknown members are refused (a typo must not pass unnoticed), or with `ignore_unknown`
    dropped as RFC 7591 §2 asks of a registration endpoint.
    """
    if not isinstance(data, dict):
        raise ClientMetadataError("invalid_client_metadata", "the client metadata must be a JSON object")
    if "client_id" in data and data["client_id"] != client_id:
        raise ClientMetadataError("invalid_client_metadata", "client_id: is not the client's id")
    for name in sorted(ISSUED_BY_SERVER & data.keys()):
        raise ClientMetadataError("invalid_client_metadata", f"{name}: is issued by the server, not chosen")
    values = {key: value for key, value in data.items() if key not in RESPONSE_ONLY and key != "client_id"}
    if ignore_unknown:
        values = {key: value for key, value in values.items() if key in ClientConfig.model_fields}
    try:
        return ClientConfig.model_validate({**values, "client_id": client_id})
    except ValidationError as exc:
        raise _metadata_error(exc) from None


def _metadata_error(exc: ValidationError) -> ClientMetadataError:
    first = exc.errors(include_url=False)[0]
    location = ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "is not a known client metadata name"
    error = "invalid_redirect_uri" if first["loc"] and first["loc"][0] in REDIRECT_FIELDS else "invalid_client_metadata"
    return ClientMetadataError(error, f"{location}: {message}" if location else message)


def client_metadata(config: ClientConfig) -> dict[str, Any]:
    """The RFC 7591 JSON of a client: every member set or differing from its default, never a secret."""
    return config.model_dump(mode="json", exclude_defaults=True, exclude=set(ISSUED_BY_SERVER))
