"""users store: upstream_links and connector_groups (people who sign in through a connector)

Revision ID: users_0004
Revises: users_0003
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "users_0004"
down_revision = "users_0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "upstream_links",
        sa.Column("connector_id", sa.String(64), primary_key=True),
        sa.Column("subject", sa.String(255), primary_key=True),
        sa.Column("user_id", sa.String(64), sa.ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
        sa.Column("provisioned", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("last_sign_in", sa.Integer, nullable=False),
        sa.UniqueConstraint("connector_id", "user_id", name="uq_upstream_links_connector_user"),
    )
    op.create_index("ix_upstream_links_user_id", "upstream_links", ["user_id"])
    op.create_table(
        "connector_groups",
        sa.Column("user_id", sa.String(64), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("connector_id", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(255), primary_key=True),
    )


def downgrade() -> None:
    op.drop_table("connector_groups")
    op.drop_table("upstream_links")
