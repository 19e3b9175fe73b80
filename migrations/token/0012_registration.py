"""token store: dynamic client registration (RFC 7591 / RFC 7592): initial access tokens, and the registration
columns of stored clients

Revision ID: token_0012
Revises: token_0011
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "token_0012"
down_revision = "token_0011"
branch_labels = None
depends_on = None
# An expansion: a new table and new nullable columns, which the code of token_0011 never reads nor needs to write
# (a client it inserts simply has no registration access token), and of token_0010, which has no clients table.
compatible_with = ("token_0011", "token_0010")


def upgrade() -> None:
    op.create_table(
        "initial_access_tokens",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("digest", sa.LargeBinary(32), nullable=False, unique=True),
        sa.Column("policy", sa.Text, nullable=False),
        sa.Column("uses_left", sa.Integer),
        sa.Column("expires_at", sa.Integer, nullable=False),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
    )
    op.create_index("ix_initial_access_tokens_expires_at", "initial_access_tokens", ["expires_at"])
    op.add_column("clients", sa.Column("registration_digest", sa.LargeBinary(32)))
    op.add_column("clients", sa.Column("initial_token_id", sa.String(32)))
    op.add_column("clients", sa.Column("registration_policy", sa.Text))
    op.create_index("ix_clients_registration_digest", "clients", ["registration_digest"], unique=True)
    op.create_index("ix_clients_initial_token_id_created_at", "clients", ["initial_token_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_clients_initial_token_id_created_at", "clients")
    op.drop_index("ix_clients_registration_digest", "clients")
    with op.batch_alter_table("clients") as batch:
        batch.drop_column("registration_policy")
        batch.drop_column("initial_token_id")
        batch.drop_column("registration_digest")
    op.drop_index("ix_initial_access_tokens_expires_at", "initial_access_tokens")
    op.drop_table("initial_access_tokens")
