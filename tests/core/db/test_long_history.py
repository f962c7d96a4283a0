"""The job path's per-message reads stay a few index entries however long the history grows; forgetting a user
reads only that user's rows.

Every message counts its user's open jobs, every reply reads its conversation's summary and, past the window, looks
for the conversation's open summary job; a chat's pictures are counted for its quota and its auto policy.
PostgreSQL's own plans are checked (EXPLAIN ANALYZE) on a long history of other users' finished jobs, memories and
pictures, including the plan it caches for every execution of a prepared statement: a scan of every job, or of
every memory, would make each message slower as the service ages.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from typing import Any

import pytest
from psycopg.sql import Literal
from sqlalchemy import bindparam, insert, text
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql import Executable

from core.db.models import Character, Chat, Conversation, Job, Memory, Message, User, utcnow
from core.db.prepared import Prepared
from core.db.repositories import _TURN, _turn_statement
from core.imaging import _count_images_since, _last_image, _of_chat
from core.jobs import JobKind, JobState
from core.memory import _FACTS_AND_SUMMARIES, _OPEN_SUMMARY, EXTRACTED, SUMMARY, forget_user

pytestmark = pytest.mark.integration

FINISHED = 3000  # the user's finished chat jobs
SUMMARIES = 300  # the conversation's finished summary jobs
OTHER_SUMMARIES = 3000  # another user's conversations in another chat, each with its summary and a picture
PICTURES = 2  # the pictures of the user's own chat


@pytest.fixture
def history(pg_sessionmaker: sessionmaker[Session]) -> dict[str, int]:
    """One user with a long finished history in one conversation; another user's jobs beside it, and their
    conversations in another chat, each with a summary and a picture."""
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
        elsewhere = Chat(platform="console", platform_chat_id="c2", is_group=False)
        session.add(elsewhere)
        session.flush()
        theirs = {"user_id": users[1].id, "character_id": character.id, "chat_id": elsewhere.id}
        others = session.scalars(insert(Conversation).returning(Conversation.id), [theirs] * OTHER_SUMMARIES).all()
        memory = {"character_id": character.id, "kind": SUMMARY, "text": "They sailed."}
        memories = [{**theirs, **memory, "conversation_id": other} for other in others]
        memories.append({**memory, "user_id": users[0].id, "chat_id": chat.id, "conversation_id": conversation.id})
        memories.append({**memory, "user_id": users[0].id, "chat_id": chat.id, "kind": EXTRACTED})
        session.execute(insert(Memory), memories)
        picture = {"kind": JobKind.IMAGE, "state": JobState.DONE}
        pictures = [
            {**picture, "user_id": users[1].id, "conversation_id": other, "params": {"chat_id": elsewhere.id}}
            for other in others
        ]
        ours = {"user_id": users[0].id, "conversation_id": conversation.id, "params": {"chat_id": chat.id}}
        pictures += [{**picture, **ours}] * PICTURES
        session.execute(insert(Job), pictures)
        session.flush()
        session.execute(text("ANALYZE"))  # the statistics autovacuum keeps in a deployment
        return {
            "conversation_id": conversation.id,
            "user_id": users[0].id,
            "character_id": character.id,
            "chat_id": chat.id,
        }


def _plan(session: Session, statement: Executable) -> dict[str, Any]:
    """PostgreSQL's plan of ``statement`` with its values written in, as EXPLAIN ANALYZE reports it."""
    sql = statement.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
    plan = session.execute(text(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}")).scalar_one()
    return (json.loads(plan) if isinstance(plan, str) else plan)[0]["Plan"]  # type: ignore[no-any-return]


def _cached_plan(session: Session, prepared: Prepared, params: dict[str, Any]) -> dict[str, Any]:
    """The plan PostgreSQL caches for every execution of ``prepared`` as the job path runs it (its generic plan)."""
    form = prepared._shape(session.get_bind().dialect, params).form(params)
    names = list(dict.fromkeys(re.findall(r"%\((\w+)\)s", form.sql)))
    sql = re.sub(r"%\((\w+)\)s", lambda match: f"${names.index(match.group(1)) + 1}", form.sql)
    values = form.values(params)
    connection = session.connection()
    connection.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
    connection.exec_driver_sql(f"PREPARE cached AS {sql}")
    driver = connection.connection.dbapi_connection
    arguments = ", ".join(Literal(values[name]).as_string(driver) for name in names)  # type: ignore[arg-type]
    plan = connection.exec_driver_sql(f"EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE cached({arguments})")
    connection.exec_driver_sql("DEALLOCATE cached")
    return plan.scalar_one()[0]["Plan"]  # type: ignore[no-any-return]


def _scans(plan: dict[str, Any], table: str) -> list[dict[str, Any]]:
    """The plan's nodes that read ``table``, however deep (subplans included)."""
    nodes, scans = [plan], []
    while nodes:
        node = nodes.pop()
        nodes.extend(node.get("Plans", []))
        if node.get("Relation Name") == table:
            scans.append(node)
    return scans


def _read(plan: dict[str, Any], table: str) -> int:
    """How many rows of ``table`` the plan reads; a scan of the whole table fails the test."""
    scans = _scans(plan, table)
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
        assert _read(_plan(session, statement), "jobs") <= 5  # the open ones: the queued chat and summary jobs


def test_the_cached_plan_of_a_turn_reads_only_the_open_jobs(
    pg_sessionmaker: sessionmaker[Session], history: dict[str, int]
) -> None:
    """A plan made without the values must still know the job states it counts: bound, they were guessed, and
    counting the queued jobs became a scan of every job."""
    params = {"platform": "console", "platform_user_id": "old", "platform_chat_id": "c1", "default_name": ""}
    with pg_sessionmaker.begin() as session:
        assert _read(_cached_plan(session, _TURN["chat"], params), "jobs") <= 5


def test_a_turn_plans_its_character_choice_once(
    pg_sessionmaker: sessionmaker[Session], history: dict[str, int]
) -> None:
    """The choice (chat's, user's, by default name, any published) is used three times: merged into each use,
    its four lookups were planned three times over (about 400 us more at each planning of the statement)."""
    params = {"platform": "console", "platform_user_id": "old", "platform_chat_id": "c1", "default_name": ""}
    with pg_sessionmaker.begin() as session:
        lookups = _scans(_cached_plan(session, _TURN["chat"], params), "characters")
    assert len(lookups) == 5  # the four of the choice, and the chosen character's name


def test_a_replys_memory_reads_only_its_conversations_and_users_memories(
    pg_sessionmaker: sessionmaker[Session], history: dict[str, int]
) -> None:
    with pg_sessionmaker() as session:
        rows = _FACTS_AND_SUMMARIES.all(session, history)
        assert sorted(row.kind for row in rows) == [EXTRACTED, SUMMARY]
        assert _read(_plan(session, _FACTS_AND_SUMMARIES.statement.params(**history)), "memories") <= 5


def test_finding_a_conversations_open_summary_reads_only_its_summaries(
    pg_sessionmaker: sessionmaker[Session], history: dict[str, int]
) -> None:
    with pg_sessionmaker() as session:
        assert _OPEN_SUMMARY.scalar(session, {"conversation_id": history["conversation_id"]}) is not None
        statement = _OPEN_SUMMARY.statement.params(conversation_id=history["conversation_id"])
        read = _read(_plan(session, statement), "jobs")
        assert read <= SUMMARIES + 1  # the conversation's summaries only, never its chat jobs or anyone else's


def test_forgetting_a_user_reads_each_table_once_at_most(
    pg_sessionmaker: sessionmaker[Session], history: dict[str, int]
) -> None:
    """Deleting a user's messages clears the jobs' references to them: without an index, every message deleted
    scanned every job (2.6 s for 82 messages beside 200,000 jobs)."""
    with pg_sessionmaker.begin() as session:
        messages = [
            Message(conversation_id=history["conversation_id"], chat_id=history["chat_id"], role=role, text="hi")
            for role in ("user", "character") * 20
        ]
        session.add_all(messages)
        session.flush()
        session.execute(
            Job.__table__.update()
            .where(Job.__table__.c.user_id == history["user_id"], Job.__table__.c.kind == JobKind.CHAT)
            .values(request_message_id=messages[0].id, reply_message_id=messages[1].id)
        )
    big = ("jobs", "memories")
    read = text("SELECT relname, seq_tup_read FROM pg_stat_xact_user_tables WHERE relname IN :tables").bindparams(
        bindparam("tables", expanding=True)
    )
    with pg_sessionmaker.begin() as session:
        rows = {table: session.scalar(text(f"SELECT count(*) FROM {table}")) for table in big}
        before = dict(session.execute(read, {"tables": big}).all())
        forget_user(session, history["user_id"])
        after = dict(session.execute(read, {"tables": big}).all())
    for table in big:  # one pass over the table at most (the user's rows are deleted in sets), not one per message
        assert after[table] - before[table] - rows[table] <= 0, (table, after[table] - before[table], rows[table])


def test_a_chats_picture_pacing_and_quota_read_only_its_own_pictures(
    pg_sessionmaker: sessionmaker[Session], history: dict[str, int]
) -> None:
    """They read the chat's pictures through its conversations: looking into every picture's params for its chat
    read every picture ever made, at every reply of a chat with pictures on auto."""
    chat_id = history["chat_id"]
    with pg_sessionmaker() as session:
        assert session.execute(_last_image(chat_id)).first() is not None
        assert _read(_plan(session, _last_image(chat_id)), "jobs") <= PICTURES
        day_ago = utcnow() - dt.timedelta(days=1)
        assert session.scalar(_count_images_since(day_ago, _of_chat(chat_id))) == PICTURES
        assert _read(_plan(session, _count_images_since(day_ago, _of_chat(chat_id))), "jobs") <= PICTURES
