"""iam: an OAuth 2.0 / OpenID Connect authorization server built around phantom tokens."""

__version__ = "0.1.0"
