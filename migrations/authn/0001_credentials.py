"""authn store: password credentials

Revision ID: authn_0001
Revises:
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "authn_0001"
down_revision = None
branch_labels = ("authn",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "credentials",
        sa.Column("subject", sa.String(64), primary_key=True),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("updated_at", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("credentials")
