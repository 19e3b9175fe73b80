"""token store: a counter of client changes, so that processes sharing one SQLite file notice every change

Revision ID: token_0013
Revises: token_0012
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "token_0013"
down_revision = "token_0012"
branch_labels = None
depends_on = None
# An expansion: a new table, which the code of token_0012 and token_0011 never reads. Their writes do not bump the
# counter; the fingerprint still holds (rows, sum of versions) beside it, which catches most of them.
compatible_with = ("token_0012", "token_0011")


def upgrade() -> None:
    table = op.create_table(
        "client_changes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("changes", sa.Integer, nullable=False),
    )
    op.bulk_insert(table, [{"id": 1, "changes": 0}])


def downgrade() -> None:
    op.drop_table("client_changes")
