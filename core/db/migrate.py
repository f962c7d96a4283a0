"""Alembic from Python: ``upgrade(url)`` and ``downgrade(url)`` for ``unichar db upgrade`` and the tests.

No ``alembic.ini`` is needed: the migration scripts live in the ``migrations`` folder beside ``core``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from core.db.session import make_engine

__all__ = ["MIGRATIONS_DIR", "alembic_config", "upgrade", "downgrade", "current", "head"]

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


def alembic_config(url: str) -> Config:
    """An Alembic config that migrates the database at ``url``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` up to ``revision`` (creating an SQLite file when needed)."""
    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Take the database at ``url`` down to ``revision``; ``base`` drops every table."""
    command.downgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    """The revision the database at ``url`` is at, None when unmigrated."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def head() -> str:
    """The revision the migration scripts bring a database to."""
    revision = ScriptDirectory.from_config(alembic_config("")).get_current_head()
    if revision is None:
        raise RuntimeError(f"no migration script in {MIGRATIONS_DIR}")
    return revision
