"""Alembic environment shared by the three stores' trees (`migrations/<store>/`).

`iam migrate` passes the connection in.
"""

from alembic import context

config = context.config
connection = config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=config.attributes["metadata"],
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
