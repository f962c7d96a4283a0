"""Alembic: upgrade -> downgrade -> upgrade on a fresh SQLite file and PostgreSQL, and no drift from the models."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from core.db.installation import SchemaNotReady, installation_token
from core.db.migrate import current, downgrade, head, upgrade
from core.db.models import Base
from core.db.session import make_engine, make_sessionmaker

pytestmark = pytest.mark.integration

REGENERATE = (
    "the models changed: regenerate the initial revision (nothing is released yet): rm migrations/versions/0001_*.py"
    " && alembic -x url=sqlite:////tmp/regen.db revision --autogenerate -m 'initial schema' --rev-id 0001"
)


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_url(request, tmp_path) -> str:
    """An empty database of each kind."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fresh.db'}"
    return request.getfixturevalue("pg_databases").create()


def tables(url: str) -> set[str]:
    engine = make_engine(url)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def drift(url: str) -> list:
    """What autogenerate would change to make the migrated schema match the models."""
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return compare_metadata(context, Base.metadata)
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(fresh_url):
    model_tables = set(Base.metadata.tables)
    upgrade(fresh_url)
    assert tables(fresh_url) == model_tables and current(fresh_url) is not None
    downgrade(fresh_url)
    assert tables(fresh_url) == set() and current(fresh_url) is None
    upgrade(fresh_url)
    assert tables(fresh_url) == model_tables


def test_the_migrations_match_the_models(fresh_url):
    upgrade(fresh_url)
    assert drift(fresh_url) == [], REGENERATE


def _name(url: str) -> str:
    engine = make_engine(url)
    try:
        return installation_token(make_sessionmaker(engine))
    finally:
        engine.dispose()


def test_each_database_gets_its_own_name(fresh_url, tmp_path):
    """The name prefixes the database's job streams: one made again (same URL, ids from 1) gets another."""
    upgrade(fresh_url)
    first = _name(fresh_url)
    downgrade(fresh_url)
    upgrade(fresh_url)
    again = _name(fresh_url)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    upgrade(other)
    assert len({first, again, _name(other)}) == 3 and all(len(n) == 16 for n in (first, again))


def test_a_database_from_before_the_name_is_named_by_its_upgrade(fresh_url):
    upgrade(fresh_url, "0001")
    with pytest.raises(SchemaNotReady, match="unichar db upgrade"):
        _name(fresh_url)
    upgrade(fresh_url)
    assert current(fresh_url) == head() and len(_name(fresh_url)) == 16
