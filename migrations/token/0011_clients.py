"""token store: clients kept as data, created and changed through the administration API and `iam clients`

Revision ID: token_0011
Revises: token_0010
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "token_0011"
down_revision = "token_0010"
branch_labels = None
depends_on = None
# An expansion: a new table, which the code of token_0010 never reads.
compatible_with = ("token_0010",)


def upgrade() -> None:
    op.create_table(
        "clients",
        sa.Column("client_id", sa.String(128), primary_key=True),
        sa.Column("metadata", sa.Text, nullable=False),
        sa.Column("secret_digest", sa.LargeBinary(32)),
        sa.Column("previous_secret_digest", sa.LargeBinary(32)),
        sa.Column("previous_expires_at", sa.Integer),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("updated_at", sa.Integer, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("clients")
