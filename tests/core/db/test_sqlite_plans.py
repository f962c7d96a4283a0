"""On SQLite, the embedded default, no statement users cause reads a whole table that grows with the service.

SQLite plans from the schema alone (it is never analysed), so a plan read on a small database is the plan of a
large one: every statement of ``bench.long_history``'s users (replies past the window, summaries, commands,
pictures, a group chat, /forget) must SEARCH the growing tables by index, never SCAN them.
"""

from __future__ import annotations

import re
import sqlite3

from sqlalchemy import Engine, event

from bench.long_history import add_characters, run_users_in_process
from core.config import Settings
from core.db.migrate import upgrade
from core.db.session import make_engine

GROWING = ("users", "chats", "conversations", "messages", "message_terms", "jobs", "memories", "notifications")


def test_every_statement_searches_the_growing_tables_by_index(settings: Settings, redis_url: str) -> None:
    settings = settings.model_copy(update={"redis_url": redis_url})
    upgrade(settings.sql_url)
    engine = make_engine(settings.sql_url)
    add_characters(engine)
    engine.dispose()
    statements: set[str] = set()

    def trace(watched: Engine) -> None:
        event.listen(watched, "connect", lambda dbapi, _record: dbapi.set_trace_callback(statements.add))

    run_users_in_process(settings, trace)
    database = sqlite3.connect(settings.sql_url.split("///", 1)[1])
    scans = {}
    for sql in statements:
        if not re.match(r"\s*(SELECT|INSERT|UPDATE|DELETE|WITH)\b", sql, re.I):
            continue
        plan = [row[-1] for row in database.execute(f"EXPLAIN QUERY PLAN {sql}")]
        whole = [step for step in plan if re.match(rf"SCAN ({'|'.join(GROWING)})\b", step)]
        if whole:
            scans[" ".join(sql.split())[:160]] = whole
    database.close()
    assert len(statements) > 300  # the users' messages, commands and jobs all ran
    assert scans == {}
