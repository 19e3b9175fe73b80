"""token store: the jti of every client assertion used, until it expires (single use across replicas)

Revision ID: token_0008
Revises: token_0007
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "token_0008"
down_revision = "token_0007"
branch_labels = None
depends_on = None
# An expansion: a new table, which the code of token_0007 never reads.
compatible_with = ("token_0007",)


def upgrade() -> None:
    op.create_table(
        "assertion_jtis",
        sa.Column("digest", sa.LargeBinary(32), primary_key=True),
        sa.Column("client_id", sa.String(128), nullable=False),
        sa.Column("expires_at", sa.Integer, nullable=False),
    )
    op.create_index("ix_assertion_jtis_expires_at", "assertion_jtis", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_assertion_jtis_expires_at", "assertion_jtis")
    op.drop_table("assertion_jtis")
