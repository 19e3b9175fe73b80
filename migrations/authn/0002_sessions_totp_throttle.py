"""authn store: SSO sessions, TOTP secrets, login throttling

Revision ID: authn_0002
Revises: authn_0001
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "authn_0002"
down_revision = "authn_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sessions",
        sa.Column("digest", sa.LargeBinary(32), primary_key=True),
        sa.Column("sid", sa.String(64), nullable=False, unique=True),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("auth_time", sa.Integer, nullable=False),
        sa.Column("amr", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("last_seen", sa.Integer, nullable=False),
        sa.Column("expires_at", sa.Integer, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_sessions_subject", "sessions", ["subject"])
    op.create_index("ix_sessions_expires_at", "sessions", ["expires_at"])
    op.create_table(
        "totp",
        sa.Column("subject", sa.String(64), primary_key=True),
        sa.Column("secret", sa.String(64), nullable=False),
        sa.Column("confirmed", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("last_step", sa.Integer, nullable=False, server_default="0"),
    )
    op.create_table(
        "login_failures",
        sa.Column("key", sa.String(320), primary_key=True),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("window_start", sa.Integer, nullable=False),
        sa.Column("locked_until", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    for table in ("login_failures", "totp", "sessions"):
        op.drop_table(table)
