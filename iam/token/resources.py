"""Resource indicators (RFC 8707): the client names the API it wants a token for, among its audiences."""

from urllib.parse import urlsplit

from iam.config import ClientConfig
from iam.errors import OAuthError


def requested_audience(resource: str | None, client: ClientConfig) -> list[str] | None:
    """The token's audience for `resource` (None: the client's, as configured); invalid_target for a resource
    that is malformed (§2: an absolute URI without a fragment) or not one of the client's audiences (§2.2)."""
    if resource is None:
        return None
    check_resource(resource)
    if resource not in client.audience:
        raise OAuthError("invalid_target", "the client may not have tokens for that resource")
    return [resource]


def check_resource(resource: str) -> None:
    """RFC 8707 §2: an absolute URI without a fragment, else invalid_target."""
    parts = urlsplit(resource)
    if not parts.scheme or not (parts.netloc or parts.path) or "#" in resource:
        raise OAuthError("invalid_target", "resource must be an absolute URI without a fragment")
