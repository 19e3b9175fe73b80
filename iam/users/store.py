"""The user store: the directory of users and groups, owned by the user-management role alone.

Passwords are never here: they live in the authentication role's credential store.
"""

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

from iam.audit_store import audit_table

metadata = MetaData()
audit_events = audit_table(metadata)  # with `audit_store: true` (iam/audit_store.py)

users = Table(
    "users",
    metadata,
    Column("id", String(64), primary_key=True),  # stable subject identifier (`sub`), a UUID
    Column("user_name", String(255), nullable=False),
    Column("user_name_key", String(255), nullable=False, unique=True),  # casefolded: SCIM userName is caseExact=false
    Column("external_id", String(255)),
    Column("display_name", String(255)),
    Column("given_name", String(255)),
    Column("family_name", String(255)),
    Column("email", String(320)),  # the primary address, lower-cased, for claims and filters
    Column("email_verified", Boolean, nullable=False, default=False),
    Column("active", Boolean, nullable=False, default=True),
    # The rest of the SCIM resource (name.formatted, nickName, phoneNumbers, ...); never a password.
    Column("attributes", JSON, nullable=False, default=dict),
    Column("version", Integer, nullable=False, default=1),  # ETag source
    Column("created_at", Integer, nullable=False),
    Column("updated_at", Integer, nullable=False),
)
Index("ix_users_email", users.c.email)

# SCIM `emails` (multi-valued), one row per address so filters like `emails[type eq "work"]` are SQL.
user_emails = Table(
    "user_emails",
    metadata,
    Column("user_id", String(64), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("position", Integer, primary_key=True),  # the order the client gave
    Column("value", String(320), nullable=False),
    Column("value_key", String(320), nullable=False),  # lower-cased: emails.value is caseExact=false
    Column("type", String(64)),
    Column("is_primary", Boolean, nullable=False, default=False),
    Column("display", String(255)),
)
Index("ix_user_emails_value_key", user_emails.c.value_key)

groups = Table(
    "groups",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("display_name", String(255), nullable=False),
    Column("display_name_key", String(255), nullable=False, unique=True),
    Column("external_id", String(255)),
    Column("version", Integer, nullable=False, default=1),
    Column("created_at", Integer, nullable=False),
    Column("updated_at", Integer, nullable=False),
)

memberships = Table(
    "memberships",
    metadata,
    Column("group_id", String(64), ForeignKey("groups.id", ondelete="CASCADE"), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
)
Index("ix_memberships_user_id", memberships.c.user_id)

# People who sign in through an upstream connector (iam/users/upstream.py): (connector id, upstream subject) is
# the identity, stable across email and username changes. One link per user and connector.
upstream_links = Table(
    "upstream_links",
    metadata,
    Column("connector_id", String(64), primary_key=True),
    Column("subject", String(255), primary_key=True),
    Column("user_id", String(64), ForeignKey("users.id", ondelete="CASCADE"), nullable=False),
    Column("provisioned", Boolean, nullable=False),  # true: the connector created the user (it owns the profile)
    Column("created_at", Integer, nullable=False),
    Column("last_sign_in", Integer, nullable=False),
    UniqueConstraint("connector_id", "user_id", name="uq_upstream_links_connector_user"),
)
Index("ix_upstream_links_user_id", upstream_links.c.user_id)

# Groups a connector says a user is in, refreshed at each upstream sign-in; apart from SCIM groups (which SCIM
# alone manages), both appear in the `groups` claim.
connector_groups = Table(
    "connector_groups",
    metadata,
    Column("user_id", String(64), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True),
    Column("connector_id", String(64), primary_key=True),
    Column("name", String(255), primary_key=True),
)
