"""token store: access tokens (digest, owner, expiry, revocation, paired JWT)

Revision ID: token_0001
Revises:
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "token_0001"
down_revision = None
branch_labels = ("token",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "access_tokens",
        sa.Column("digest", sa.LargeBinary(32), primary_key=True),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("subject", sa.String(255), nullable=False),
        sa.Column("expires_at", sa.Integer, nullable=False),
        sa.Column("revoked", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("jwt", sa.Text, nullable=False),
    )
    op.create_index("ix_access_tokens_client_id", "access_tokens", ["client_id"])
    op.create_index("ix_access_tokens_expires_at", "access_tokens", ["expires_at"])


def downgrade() -> None:
    op.drop_table("access_tokens")
