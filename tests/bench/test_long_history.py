"""bench.long_history fills the current schema and reports the statements PostgreSQL found slow, with plans."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.long_history import measure

pytestmark = pytest.mark.integration


def test_fills_a_history_runs_every_user_action_and_reports_slow_statements(
    pg_url: str, redis_url: str, tmp_path: Path
) -> None:
    slow, _filled_s = measure(pg_url, redis_url, tmp_path, users=30, slow_ms=0)  # 0 ms: every statement is reported
    statements = "\n".join(slow.seen)
    assert "INSERT INTO messages" in statements and "UPDATE jobs" in statements  # replies were stored
    assert 'DELETE FROM ONLY "public"."conversations"' in statements  # /forget me confirm ran, cascades included
    count, _slowest, plan = slow.seen[next(s for s in slow.seen if s.startswith("INSERT INTO messages"))]
    assert count >= 30 and "Insert on messages" in plan
