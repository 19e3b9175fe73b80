"""token store: the TLS client certificate a public client's refresh tokens are bound to (RFC 8705 §4)

Revision ID: token_0010
Revises: token_0009
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "token_0010"
down_revision = "token_0009"
branch_labels = None
depends_on = None
# An expansion: a nullable column, which the code of token_0009 neither reads nor needs to write.
compatible_with = ("token_0009",)


def upgrade() -> None:
    op.add_column("grants", sa.Column("cnf_x5t", sa.String(64)))


def downgrade() -> None:
    op.drop_column("grants", "cnf_x5t")
