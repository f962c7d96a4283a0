"""Alembic environment: the models' metadata, the URL from the caller or the settings, batch mode on SQLite."""

from __future__ import annotations

import logging.config

from alembic import context
from alembic.operations import ops
from sqlalchemy import Connection, ForeignKeyConstraint

from core.config import Settings
from core.db.models import Base
from core.db.session import make_engine

config = context.config
if config.config_file_name is not None and not config.attributes.get("quiet"):
    logging.config.fileConfig(config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    """Precedence: the caller's url attribute, then ``-x url=...``, then UNICHAR_DATABASE_URL / the default file."""
    return config.attributes.get("url") or context.get_x_argument(as_dictionary=True).get("url") or Settings().sql_url


def _defer_cyclic_keys(_context, _revision, directives) -> None:  # type: ignore[no-untyped-def]
    """Create use_alter foreign keys (users <-> characters) after every table exists, and drop them first.

    Autogenerate keeps them inside ``create_table``, where PostgreSQL silently leaves them out.
    """
    script = directives[0]
    deferred: list[ForeignKeyConstraint] = []
    for op in script.upgrade_ops.ops:
        if isinstance(op, ops.CreateTableOp):
            keys = [c for c in op.columns if isinstance(c, ForeignKeyConstraint) and c.use_alter]
            op.columns[:] = [c for c in op.columns if not any(c is key for key in keys)]
            deferred += keys
    for key in deferred:
        table = key.parent.name
        script.upgrade_ops.ops.append(ops.ModifyTableOps(table, [ops.CreateForeignKeyOp.from_constraint(key)]))
        script.downgrade_ops.ops.insert(0, ops.ModifyTableOps(table, [ops.DropConstraintOp.from_constraint(key)]))


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
        compare_type=True,
        process_revision_directives=_defer_cyclic_keys,
    )


def run_offline() -> None:
    """Emit SQL to stdout instead of connecting (``alembic upgrade head --sql``)."""
    url = _url()
    context.configure(
        url=url,
        target_metadata=Base.metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    """Migrate through a live connection (the caller's, when it passes one)."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            _configure(connection)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
