"""token store: grants indexed by subject and client (a person removing one application's access)

An expansion: the index is new and the code of token_0005 ignores it, so that code keeps working with this
schema (`compatible_with`). On PostgreSQL it is built CONCURRENTLY: writes to grants go on meanwhile.

Revision ID: token_0006
Revises: token_0005
Create Date: 2026-12-01
"""

from alembic import op

revision = "token_0006"
down_revision = "token_0005"
branch_labels = None
depends_on = None
compatible_with = ("token_0005",)


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        with op.get_context().autocommit_block():
            op.create_index("ix_grants_subject_client_id", "grants", ["subject", "client_id"],
                            postgresql_concurrently=True, if_not_exists=True)
    else:
        op.create_index("ix_grants_subject_client_id", "grants", ["subject", "client_id"])


def downgrade() -> None:
    op.drop_index("ix_grants_subject_client_id", "grants")
