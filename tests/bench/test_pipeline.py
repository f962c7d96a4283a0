"""bench.pipeline's stand-in for autovacuum maintains the tables a deployment's server would, and no others."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from bench.pipeline import Autovacuum
from core.db.session import make_engine

pytestmark = pytest.mark.integration


def test_vacuums_and_analyses_the_tables_past_autovacuums_thresholds(pg_url: str) -> None:
    engine = make_engine(pg_url)
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE busy (id int PRIMARY KEY, state text)"))
        connection.execute(text("CREATE TABLE quiet (id int PRIMARY KEY)"))
        connection.execute(text("INSERT INTO busy SELECT g, 'queued' FROM generate_series(1, 2000) g"))
        connection.execute(text("INSERT INTO quiet VALUES (1)"))
        connection.execute(text("UPDATE busy SET state = 'done'"))  # 2,000 dead row versions
        connection.execute(text("SELECT pg_stat_force_next_flush()"))  # the counts reach the statistics at commit
    stats = (
        "SELECT relname, last_vacuum IS NOT NULL, last_analyze IS NOT NULL FROM pg_stat_user_tables"
        " WHERE relname IN ('busy', 'quiet')"
    )
    try:
        stand_in = Autovacuum(engine)
        stand_in.maintain()
        with engine.connect() as connection:
            maintained = {name: (vacuumed, analysed) for name, vacuumed, analysed in connection.execute(text(stats))}
            dead = connection.execute(text("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'busy'"))
            assert dead.scalar_one() == 0
        assert maintained == {"busy": (True, True), "quiet": (False, False)}  # one change is under both thresholds
        assert stand_in.runs >= 2  # the database's other tables may be due too
    finally:
        with engine.begin() as connection:
            connection.execute(text("DROP TABLE busy, quiet"))
        engine.dispose()
