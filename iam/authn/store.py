"""The credential store: password hashes, owned by the authentication role alone."""

from sqlalchemy import Column, Integer, MetaData, String, Table

metadata = MetaData()

credentials = Table(
    "credentials",
    metadata,
    Column("subject", String(64), primary_key=True),  # the user's id in the user store
    Column("password_hash", String(255), nullable=False),  # argon2id, PHC string format
    Column("updated_at", Integer, nullable=False),
)
