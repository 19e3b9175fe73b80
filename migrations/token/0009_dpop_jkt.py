"""token store: the DPoP key a grant is bound to (RFC 9449 §5 refresh tokens of public clients, §10 dpop_jkt)

Revision ID: token_0009
Revises: token_0008
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "token_0009"
down_revision = "token_0008"
branch_labels = None
depends_on = None
# An expansion: two nullable columns, which the code of token_0008 neither reads nor needs to write.
compatible_with = ("token_0008",)


def upgrade() -> None:
    op.add_column("grants", sa.Column("dpop_jkt", sa.String(64)))
    op.add_column("authorization_requests", sa.Column("dpop_jkt", sa.String(64)))


def downgrade() -> None:
    op.drop_column("authorization_requests", "dpop_jkt")
    op.drop_column("grants", "dpop_jkt")
