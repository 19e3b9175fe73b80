"""authn store: audit_events (audit events kept in the store too, `audit_store: true`)

Revision ID: authn_0003
Revises: authn_0002
Create Date: 2026-11-30
"""

import sqlalchemy as sa
from alembic import op

revision = "authn_0003"
down_revision = "authn_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("at", sa.BigInteger, nullable=False),
        sa.Column("event", sa.String(64), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("actor", sa.String(255)),
        sa.Column("client_id", sa.String(128)),
        sa.Column("source", sa.String(64)),
        sa.Column("details", sa.Text, nullable=False),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_event", "audit_events", ["event"])
    op.create_index("ix_audit_events_actor", "audit_events", ["actor"])


def downgrade() -> None:
    op.drop_table("audit_events")
