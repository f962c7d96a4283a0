"""bench.pipeline runs end to end on both databases. Its stand-in for autovacuum maintains the tables a deployment's
server would, and no others, and a stand-in that stopped fails the run."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import text

from bench.pipeline import Autovacuum
from core.db.session import make_engine
from tests.conftest import PgDatabases

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


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


def test_runs_a_short_bench_on_both_databases(
    pg_databases: PgDatabases,
    redis_url: str,  # requested to skip without Redis; the bench starts a private server of its own
) -> None:
    """The bench keeps working as the job path changes: a real worker process, its own Redis, both databases.

    It runs as its users run it, a process of its own: its frontend builds a Celery app per database.
    """
    argv = ["--messages", "6", "--users", "2", "--per-user", "3", "--warmup", "2", "--worker-cpus", "all"]
    env = {**os.environ, "UNICHAR_BENCH_PG_URL": pg_databases.admin_url}  # the bench makes and drops its database
    run = subprocess.run(
        [sys.executable, "-m", "bench.pipeline", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in run.stdout.splitlines() if line.startswith("| ")]
    measured = {cells[0].strip(): cells for cells in rows[1:]}  # below the header
    assert set(measured) == {"sqlite", "postgresql"}
    for cells in measured.values():
        assert float(cells[2]) > 0 and cells[5].strip() == "6"  # p50 ms, sequential messages
        assert cells[6].strip().endswith("with 2 users (6)")  # throughput over 2 users x 3 messages
        assert "worker" in cells[7] and "client" in cells[7]  # CPU a message by process
    assert "postgres" in measured["postgresql"][7]


def test_a_stand_in_that_stopped_fails_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unmaintained tables would make the run's figures quietly wrong: the error surfaces when the run ends."""
    calls = []

    def maintain(_self: Autovacuum) -> None:
        calls.append(1)
        if len(calls) > 1:
            raise OSError("the server went away")

    monkeypatch.setattr(Autovacuum, "maintain", maintain)
    stand_in = Autovacuum(engine=None, interval_s=0.01)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="stopped during the run") as raised:
        with stand_in:
            while len(calls) < 2:
                time.sleep(0.01)
    assert isinstance(raised.value.__cause__, OSError)
