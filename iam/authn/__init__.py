"""The authentication role: login, sessions and the credential store."""
