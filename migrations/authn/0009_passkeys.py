"""authn store: passkeys (WebAuthn credentials) and their single-use challenges

Revision ID: authn_0009
Revises: authn_0008
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "authn_0009"
down_revision = "authn_0008"
branch_labels = None
depends_on = None
# An expansion: the code of authn_0008 never reads the new tables.
compatible_with = ("authn_0008",)


def upgrade() -> None:
    op.create_table(
        "passkeys",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("subject", sa.String(64), nullable=False),
        sa.Column("credential_id", sa.LargeBinary(1023), nullable=False, unique=True),
        sa.Column("public_key", sa.LargeBinary, nullable=False),
        sa.Column("sign_count", sa.BigInteger, nullable=False),
        sa.Column("backup_eligible", sa.Boolean, nullable=False),
        sa.Column("backup_state", sa.Boolean, nullable=False),
        sa.Column("transports", sa.String(255), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Integer, nullable=False),
        sa.Column("last_used_at", sa.Integer),
    )
    op.create_index("ix_passkeys_subject", "passkeys", ["subject"])
    op.create_table(
        "passkey_challenges",
        sa.Column("digest", sa.LargeBinary(32), primary_key=True),
        sa.Column("purpose", sa.String(16), nullable=False),
        sa.Column("subject", sa.String(64)),
        sa.Column("binding", sa.LargeBinary(32), nullable=False),
        sa.Column("expires_at", sa.Integer, nullable=False),
    )
    op.create_index("ix_passkey_challenges_expires_at", "passkey_challenges", ["expires_at"])


def downgrade() -> None:
    op.drop_table("passkey_challenges")
    op.drop_table("passkeys")
