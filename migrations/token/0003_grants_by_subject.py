"""token store: grants indexed by subject (a person's list of applications, revocation of a user)

Revision ID: token_0003
Revises: token_0002
Create Date: 2026-11-30
"""

from alembic import op

revision = "token_0003"
down_revision = "token_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_grants_subject", "grants", ["subject"])


def downgrade() -> None:
    op.drop_index("ix_grants_subject", "grants")
