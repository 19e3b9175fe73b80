"""users store: user_emails (SCIM emails, one row per address)

Revision ID: users_0002
Revises: users_0001
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "users_0002"
down_revision = "users_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "user_emails",
        sa.Column("user_id", sa.String(64), sa.ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("position", sa.Integer, primary_key=True),
        sa.Column("value", sa.String(320), nullable=False),
        sa.Column("value_key", sa.String(320), nullable=False),
        sa.Column("type", sa.String(64)),
        sa.Column("is_primary", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("display", sa.String(255)),
    )
    op.create_index("ix_user_emails_value_key", "user_emails", ["value_key"])
    # Users created before this revision kept one address, in users.email: it becomes their primary email.
    users = sa.table("users", sa.column("id", sa.String), sa.column("email", sa.String))
    emails = sa.table(
        "user_emails",
        sa.column("user_id", sa.String),
        sa.column("position", sa.Integer),
        sa.column("value", sa.String),
        sa.column("value_key", sa.String),
        sa.column("is_primary", sa.Boolean),
    )
    bind = op.get_bind()
    rows = bind.execute(sa.select(users.c.id, users.c.email).where(users.c.email.is_not(None))).all()
    if rows:
        op.bulk_insert(
            emails,
            [{"user_id": r.id, "position": 0, "value": r.email, "value_key": r.email.lower(), "is_primary": True}
             for r in rows],
        )


def downgrade() -> None:
    op.drop_index("ix_user_emails_value_key", table_name="user_emails")
    op.drop_table("user_emails")
