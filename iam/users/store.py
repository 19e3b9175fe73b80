"""The user store: the directory of users, owned by the user-management role alone."""

from sqlalchemy import Boolean, Column, Integer, MetaData, String, Table

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", String(64), primary_key=True),  # stable subject identifier (`sub`)
    Column("user_name", String(255), nullable=False, unique=True),
    Column("active", Boolean, nullable=False, default=True),
    Column("created_at", Integer, nullable=False),
    Column("updated_at", Integer, nullable=False),
)
