"""token store: grants, pending authorization requests, codes, refresh tokens, device codes

Revision ID: token_0002
Revises: token_0001
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "token_0002"
down_revision = "token_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("access_tokens") as batch:
        batch.add_column(sa.Column("grant_id", sa.String(64)))
        batch.create_index("ix_access_tokens_grant_id", ["grant_id"])
    op.create_table(
        "grants",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("sid", sa.String(64)),
        sa.Column("auth_time", sa.Integer, nullable=False),
        sa.Column("amr", sa.String(255), nullable=False),
        sa.Column("acr", sa.String(64)),
        sa.Column("nonce", sa.Text),
        sa.Column("offline", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("expires_at", sa.Integer, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_grants_sid", "grants", ["sid"])
    op.create_index("ix_grants_expires_at", "grants", ["expires_at"])
    op.create_table(
        "authorization_requests",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("redirect_uri", sa.Text, nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("state", sa.Text),
        sa.Column("nonce", sa.Text),
        sa.Column("code_challenge", sa.String(128)),
        sa.Column("prompt", sa.String(64)),
        sa.Column("max_age", sa.Integer),
        sa.Column("subject_hint", sa.String(255)),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("expires_at", sa.Integer, nullable=False),
    )
    op.create_index("ix_authorization_requests_expires_at", "authorization_requests", ["expires_at"])
    op.create_table(
        "codes",
        sa.Column("digest", sa.LargeBinary(32), primary_key=True),
        sa.Column("grant_id", sa.String(64), nullable=False),
        sa.Column("redirect_uri", sa.Text, nullable=False),
        sa.Column("code_challenge", sa.String(128)),
        sa.Column("expires_at", sa.Integer, nullable=False),
        sa.Column("consumed", sa.Boolean, nullable=False, server_default=sa.false()),
    )
    op.create_index("ix_codes_expires_at", "codes", ["expires_at"])
    op.create_table(
        "refresh_tokens",
        sa.Column("digest", sa.LargeBinary(32), primary_key=True),
        sa.Column("grant_id", sa.String(64), nullable=False),
        sa.Column("issued_at", sa.Integer, nullable=False),
        sa.Column("expires_at", sa.Integer, nullable=False),
        sa.Column("used_at", sa.Integer),
        sa.Column("revoked", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("successor", sa.LargeBinary),
    )
    op.create_index("ix_refresh_tokens_grant_id", "refresh_tokens", ["grant_id"])
    op.create_table(
        "device_codes",
        sa.Column("digest", sa.LargeBinary(32), primary_key=True),
        sa.Column("user_code", sa.LargeBinary(32), nullable=False, unique=True),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("interval", sa.Integer, nullable=False),
        sa.Column("last_poll", sa.Integer, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("grant_id", sa.String(64)),
        sa.Column("expires_at", sa.Integer, nullable=False),
    )
    op.create_index("ix_device_codes_expires_at", "device_codes", ["expires_at"])
    op.create_index("ix_refresh_tokens_expires_at", "refresh_tokens", ["expires_at"])


def downgrade() -> None:
    for table in ("device_codes", "refresh_tokens", "codes", "authorization_requests", "grants"):
        op.drop_table(table)
    with op.batch_alter_table("access_tokens") as batch:
        batch.drop_index("ix_access_tokens_grant_id")
        batch.drop_column("grant_id")
