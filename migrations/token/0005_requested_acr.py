"""token store: the acr values a pending authorization request asked for (OIDC Core §3.1.2.1 acr_values)

Revision ID: token_0005
Revises: token_0004
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "token_0005"
down_revision = "token_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("authorization_requests", sa.Column("acr_values", sa.String(64)))


def downgrade() -> None:
    op.drop_column("authorization_requests", "acr_values")
