"""The job path's per-message reads of the jobs table stay a few index entries however long the history grows.

Every message counts its user's open jobs, and every reply past the window looks for the conversation's open
summary job. PostgreSQL's own plans are checked (EXPLAIN ANALYZE) on a history of finished jobs: a scan of every
job, or of every job the user ever had, would make each message slower as the service ages.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import insert, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import Executable

from core.db.models import Character, Chat, Conversation, Job, User
from core.db.repositories import _turn_statement
from core.jobs import JobKind, JobState
from core.memory import _OPEN_SUMMARY

pytestmark = pytest.mark.integration

FINISHED = 3000  # the user's finished chat jobs
SUMMARIES = 300  # the conversation's finished summary jobs


@pytest.fixture
def history(pg_sessionmaker: sessionmaker[Session]) -> dict[str, int]:
    """One user with a long finished history in one conversation, another user's jobs beside it."""
    with pg_sessionmaker.begin() as session:
        users = [User(platform="console", platform_user_id=name, display_name=name) for name in ("old", "other")]
        chat = Chat(platform="console", platform_chat_id="c1", is_group=False)
        character = Character(name="Furina", description="A test character.")
        session.add_all([*users, chat, character])
        session.flush()
        conversation = Conversation(user_id=users[0].id, character_id=character.id, chat_id=chat.id)
        session.add(conversation)
        session.flush()

        def jobs(user: User, kind: JobKind, state: JobState, count: int) -> list[dict[str, Any]]:
            return [
                {"kind": kind, "state": state, "user_id": user.id, "conversation_id": conversation.id}
                for _ in range(count)
            ]

        rows = jobs(users[0], JobKind.CHAT, JobState.DONE, FINISHED) + jobs(users[1], JobKind.CHAT, JobState.DONE, 500)
        rows += jobs(users[0], JobKind.SUMMARY, JobState.DONE, SUMMARIES)
        rows += jobs(users[0], JobKind.CHAT, JobState.QUEUED, 1) + jobs(users[0], JobKind.SUMMARY, JobState.QUEUED, 1)
        session.execute(insert(Job), rows)
        session.flush()
        session.execute(text("ANALYZE jobs"))  # the statistics autovacuum keeps in a deployment
        return {"conversation_id": conversation.id}


def _jobs_scans(session: Session, statement: Executable) -> Iterator[dict[str, Any]]:
    """The plan nodes of ``statement`` that read the jobs table, as EXPLAIN ANALYZE reports them."""
    sql = statement.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
    plan = session.execute(text(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}")).scalar_one()
    nodes = [(json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]]
    while nodes:
        node = nodes.pop()
        nodes.extend(node.get("Plans", []))
        if node.get("Relation Name") == "jobs":
            yield node


def _jobs_read(session: Session, statement: Executable) -> int:
    """How many rows of the jobs table ``statement`` reads; a scan of the whole table fails the test."""
    scans = list(_jobs_scans(session, statement))
    assert scans
    assert all(node["Node Type"] != "Seq Scan" for node in scans), [node["Node Type"] for node in scans]
    return sum((node["Actual Rows"] + node.get("Rows Removed by Filter", 0)) * node["Actual Loops"] for node in scans)


def test_counting_a_users_open_jobs_reads_only_those(
    pg_sessionmaker: sessionmaker[Session], history: dict[str, int]
) -> None:
    statement = _turn_statement("chat").params(
        platform="console", platform_user_id="old", platform_chat_id="c1", default_name=None
    )
    with pg_sessionmaker() as session:
        assert _jobs_read(session, statement) <= 5  # the open ones: the queued chat and summary jobs


def test_finding_a_conversations_open_summary_reads_only_its_summaries(
    pg_sessionmaker: sessionmaker[Session], history: dict[str, int]
) -> None:
    with pg_sessionmaker() as session:
        assert _OPEN_SUMMARY.scalar(session, history) is not None
        read = _jobs_read(session, _OPEN_SUMMARY.statement.params(**history))
        assert read <= SUMMARIES + 1  # the conversation's summaries only, never its chat jobs or anyone else's
