"""authn store: password reset links

Revision ID: authn_0008
Revises: authn_0007
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "authn_0008"
down_revision = "authn_0007"
branch_labels = None
depends_on = None
# An expansion: the code of authn_0007 never reads the new table.
compatible_with = ("authn_0007",)


def upgrade() -> None:
    op.create_table(
        "password_resets",
        sa.Column("digest", sa.LargeBinary(32), primary_key=True),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("expires_at", sa.Integer, nullable=False),
    )
    op.create_index("ix_password_resets_subject", "password_resets", ["subject"])
    op.create_index("ix_password_resets_expires_at", "password_resets", ["expires_at"])


def downgrade() -> None:
    op.drop_table("password_resets")
