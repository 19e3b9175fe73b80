"""authn store: TOTP recovery codes

Revision ID: authn_0007
Revises: authn_0006
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "authn_0007"
down_revision = "authn_0006"
branch_labels = None
depends_on = None
# An expansion: the code of authn_0006 never reads the new table.
compatible_with = ("authn_0006",)


def upgrade() -> None:
    op.create_table(
        "recovery_codes",
        sa.Column("subject", sa.String(64), primary_key=True),
        sa.Column("digest", sa.LargeBinary(32), primary_key=True),
        sa.Column("created_at", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("recovery_codes")
