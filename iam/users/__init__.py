"""The user-management role: the directory of users and groups, and the user store."""
