"""The service roles one image can play, and the store each one owns (docs/architecture.md)."""

from enum import StrEnum


class Role(StrEnum):
    AUTHENTICATION = "authentication"
    TOKEN = "token"
    USER_MANAGEMENT = "user-management"
    ALL = "all"

    def serves(self, role: "Role") -> bool:
        return self is Role.ALL or self is role

    @property
    def stores(self) -> tuple[str, ...]:
        """Names of the stores this role opens: its own and no other."""
        if self is Role.ALL:
            return ("authn", "token", "users")
        return (STORE_OF[self],)


STORE_OF = {
    Role.AUTHENTICATION: "authn",
    Role.TOKEN: "token",
    Role.USER_MANAGEMENT: "users",
}
