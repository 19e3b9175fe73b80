"""authn store: room for TOTP secrets sealed with the data key

Revision ID: authn_0005
Revises: authn_0004
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "authn_0005"
down_revision = "authn_0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("totp") as batch:
        batch.alter_column("secret", type_=sa.String(255), existing_type=sa.String(64), existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("totp") as batch:
        batch.alter_column("secret", type_=sa.String(64), existing_type=sa.String(255), existing_nullable=False)
