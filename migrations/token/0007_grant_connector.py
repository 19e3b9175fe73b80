"""token store: the connector a grant's sign-in went through (refresh re-checks LDAP ones); room for upstream acr

Revision ID: token_0007
Revises: token_0006
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "token_0007"
down_revision = "token_0006"
branch_labels = None
depends_on = None
# An expansion: the code of token_0006 never reads the new column and writes acr values that fit either width.
compatible_with = ("token_0006",)


def upgrade() -> None:
    with op.batch_alter_table("grants") as batch:
        batch.add_column(sa.Column("connector", sa.String(64)))
        batch.alter_column("acr", type_=sa.String(255), existing_type=sa.String(64), existing_nullable=True)


def downgrade() -> None:
    with op.batch_alter_table("grants") as batch:
        batch.alter_column("acr", type_=sa.String(64), existing_type=sa.String(255), existing_nullable=True)
        batch.drop_column("connector")
