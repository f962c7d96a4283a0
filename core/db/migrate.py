"""Alembic from Python: ``upgrade(url)`` and ``downgrade(url)`` for ``unichar db upgrade`` and the tests.

No ``alembic.ini`` is needed: the migration scripts live in the ``migrations`` folder beside ``core``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from core.db.session import make_engine

__all__ = ["MIGRATIONS_DIR", "alembic_config", "upgrade", "downgrade", "current", "head"]

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"

log = logging.getLogger(__name__)


def alembic_config(url: str) -> Config:
    """An Alembic config that migrates the database at ``url``."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["url"] = url
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the database at ``url`` up to ``revision`` (creating an SQLite file when needed)."""
    _migrate(command.upgrade, url, revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Take the database at ``url`` down to ``revision``; ``base`` drops every table."""
    _migrate(command.downgrade, url, revision)


def _migrate(step: Callable[[Config, str], None], url: str, revision: str) -> None:
    """Run one Alembic command and log one line when the revision changed (the CLI quiets Alembic's own lines,
    which a command that only checks the schema would otherwise print every time)."""
    before = current(url)
    step(alembic_config(url), revision)
    after = current(url)
    if after != before:
        log.info("SQL store migrated from %s to %s", before or "no schema", after or "no schema")


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
