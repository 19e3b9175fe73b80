"""The user-management role's services, built once per instance and reached by its handlers through
`user_services()`."""

from __future__ import annotations

from fastapi import Request

from iam.peers import Credentials, Tokens
from iam.runtime import Shared
from iam.users.directory import Directory
from iam.users.store import UserStore
from iam.users.upstream import UpstreamAccounts


class UserServices:
    """The directory of users and groups; and its peers: the authentication role's credential store
    (`credentials`) and the token role (`tokens`), which the SCIM API asks about its callers' access tokens."""

    # The peers, set by connect().
    credentials: Credentials
    tokens: Tokens

    def __init__(self, shared: Shared) -> None:
        self.settings = shared.settings
        self.store = UserStore(shared.stores["users"].engine)  # the role's SQL, all of it

    def connect(self, credentials: Credentials, tokens: Tokens) -> None:
        self.credentials = credentials
        self.tokens = tokens
        self.directory = Directory(self.store, credentials)
        self.upstream = UpstreamAccounts(self.directory)  # people who sign in through a connector
        # A disabled or deleted user loses every grant and session at once, in whichever process they live.
        self.directory.on_disabled += [tokens.revoke_subject, credentials.end_sessions]


def user_services(request: Request) -> UserServices:
    """The user-management role's services of the instance serving this request (iam/app.py sets them)."""
    services: UserServices = request.app.state.iam.users
    return services
