"""authn store: consents (what a person allowed a client that asks for consent)

Revision ID: authn_0004
Revises: authn_0003
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "authn_0004"
down_revision = "authn_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "consents",
        sa.Column("subject", sa.String(64), primary_key=True),
        sa.Column("client_id", sa.String(128), primary_key=True),
        sa.Column("scope", sa.Text, nullable=False),
        sa.Column("updated_at", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("consents")
