"""authn store: sign-ins through connectors (pending upstream requests; a session's connector and acr)

Revision ID: authn_0006
Revises: authn_0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "authn_0006"
down_revision = "authn_0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "upstream_requests",
        sa.Column("state_digest", sa.LargeBinary(32), primary_key=True),
        sa.Column("browser_digest", sa.LargeBinary(32), nullable=False),
        sa.Column("connector_id", sa.String(64), nullable=False),
        sa.Column("pending", sa.Text, nullable=False),
        sa.Column("flow", sa.Text, nullable=False),
        sa.Column("expires_at", sa.Integer, nullable=False),
    )
    op.create_index("ix_upstream_requests_expires_at", "upstream_requests", ["expires_at"])
    with op.batch_alter_table("sessions") as batch:
        batch.alter_column("amr", type_=sa.String(255), existing_type=sa.String(64), existing_nullable=False)
        batch.add_column(sa.Column("acr", sa.String(255)))
        batch.add_column(sa.Column("connector", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("connector")
        batch.drop_column("acr")
        batch.alter_column("amr", type_=sa.String(64), existing_type=sa.String(255), existing_nullable=False)
    op.drop_table("upstream_requests")
