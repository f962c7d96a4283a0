"""Every statement users cause, on a database with a long history: which ones are slow, with PostgreSQL's plans.

A benchmark, not a test. It fills a fresh PostgreSQL database the way a service that has run a while would
hold it. Each of ``--users`` users has a private chat with one 20-turn conversation, its jobs, a rolling summary and
a fact, and recall postings for every turn. Every tenth chat also has three pictures. It then analyses the
database, as autovacuum would, and runs in one process what users do:
- replies in a long conversation (past the window, with rolling summaries), and a first contact;
- every command, including pictures (/imagine, Regenerate), /forget all and /forget me confirm;
- a group chat, and a chat whose picture policy is auto.

The model is the zero-cost double, so SQL and Python are all that run. PostgreSQL's ``auto_explain``, loaded into
each of the bench's connections (which needs a superuser, as on this machine), reports every statement slower than
``--slow-ms`` with its plan. A scan that grows with the history shows up here long before users feel it.

    python -m bench.long_history [--users 20000] [--slow-ms 1] [--plans]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event, text

from bench.pipeline import postgres_database, unused_redis_url
from core.chat import ChatService
from core.config import Settings
from core.db.migrate import upgrade
from core.db.models import Character
from core.db.session import make_engine, make_sessionmaker
from core.jobs import IncomingMessage, JobKind
from unichar.arguments import at_least
from unichar.run import private_redis

_TURNS = 20  # a conversation's turns, user and character in turn
_WORDS = "ARRAY['harbour','dusk','storm','bay','bread','lighthouse','map','isles']"
_HISTORY = (  # bound: users; every user gets the private chat of the same platform id
    "INSERT INTO users (platform, platform_user_id, display_name, persona, blocked_bot, created_at)"
    " SELECT 'bench', 'h' || g, 'H' || g, '', false, now() FROM generate_series(1, :users) g",
    "INSERT INTO chats (platform, platform_chat_id, is_group, nsfw_allowed, settings, created_at)"
    " SELECT 'bench', 'h' || g, false, false, '{}', now() FROM generate_series(1, :users) g",
    "INSERT INTO conversations (user_id, character_id, chat_id, active, created_at)"
    " SELECT u.id, 1, c.id, true, now() FROM users u JOIN chats c ON c.platform_chat_id = u.platform_user_id",
    "INSERT INTO messages (conversation_id, chat_id, role, text, image_keys, platform_reply_ids, created_at)"
    " SELECT v.id, v.chat_id, CASE WHEN g % 2 = 1 THEN 'user' ELSE 'character' END,"
    f" ({_WORDS})[1 + (g + v.id) % 8] || ' and ' || ({_WORDS})[1 + (g * v.id) % 8], '[]', '[]',"
    f" now() - interval '2 days' FROM conversations v, generate_series(1, {_TURNS}) g ORDER BY v.id, g",
    # the recall index: a posting per word, and the document marker (term '') every indexed turn has
    "INSERT INTO message_terms (message_id, term, chat_id, conversation_id, count, length)"
    " SELECT m.id, t.term, m.chat_id, m.conversation_id, CASE WHEN t.term = '' THEN 0 ELSE 1 END, 2 FROM messages m,"
    " LATERAL (SELECT unnest(string_to_array(m.text, ' ')) UNION SELECT '') t(term) WHERE t.term <> 'and'",
    "INSERT INTO jobs (kind, state, user_id, conversation_id, request_message_id, reply_message_id, params, result,"
    " attempts, progress, created_at, queued_at, delivery, delivered_at)"
    " SELECT 'chat', 'done', v.user_id, v.id, m.id, m.id + 1, '{}', '{}', 1, 1, m.created_at, m.created_at, '{}',"
    " m.created_at FROM conversations v JOIN messages m ON m.conversation_id = v.id AND m.role = 'user'",
    "INSERT INTO jobs (kind, state, user_id, conversation_id, params, result, attempts, progress, created_at,"
    " queued_at, delivery, delivered_at) SELECT 'image', 'done', v.user_id, v.id, json_build_object('chat_id',"
    " v.chat_id), '{}', 1, 1, now() - interval '2 days', now() - interval '2 days', '{}', now()"
    " FROM conversations v, generate_series(1, 3) WHERE v.id % 10 = 0",
    "INSERT INTO jobs (kind, state, user_id, conversation_id, params, result, attempts, progress, created_at,"
    " queued_at, delivery) SELECT 'summary', 'done', v.user_id, v.id, '{}', '{}', 1, 1, now(), now(), '{}'"
    " FROM conversations v",
    "INSERT INTO memories (user_id, character_id, conversation_id, chat_id, kind, text, covers_until_message_id,"
    " created_at) SELECT v.user_id, 1, v.id, v.chat_id, 'summary', 'They talked about the sea.',"
    " (SELECT min(id) + 5 FROM messages WHERE conversation_id = v.id), now() FROM conversations v",
    "INSERT INTO memories (user_id, character_id, chat_id, kind, text, created_at)"
    " SELECT v.user_id, 1, v.chat_id, 'extracted', 'Likes ships.', now() FROM conversations v",
)


def add_characters(engine: Engine) -> None:
    """The two characters :func:`run_users` talks to and switches between."""
    with make_sessionmaker(engine).begin() as session:
        session.add_all([Character(name="Bench", description="Answers at once."), Character(name="Other")])


def fill(engine: Engine, users: int) -> None:
    """The long history: the characters, then ``users`` users with their chats, turns, jobs and memories."""
    add_characters(engine)
    with engine.begin() as connection:
        for statement in _HISTORY:
            connection.execute(text(statement), {"users": users})
    with engine.connect() as connection:
        connection.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE"))


@dataclass
class SlowStatements:
    """What auto_explain reported: per statement text, how often it was slow, its slowest time and plan."""

    seen: dict[str, tuple[int, float, str]] = field(default_factory=dict)

    def note(self, message: str) -> None:
        match = re.match(r"duration: ([0-9.]+) ms\s+plan:\s*Query Text: (.*)", message, re.S)
        if match is None:
            return
        ms, rest = float(match.group(1)), match.group(2)
        statement = " ".join(rest.split("\n", 1)[0].split())  # the first line names the statement well enough
        count, slowest, plan = self.seen.get(statement, (0, 0.0, ""))
        self.seen[statement] = (count + 1, max(slowest, ms), rest if ms >= slowest else plan)


def explain_slow(engine: Engine, slow_ms: int, sink: SlowStatements) -> None:
    """Every connection ``engine`` opens from now on reports statements slower than ``slow_ms`` to ``sink``."""

    def load(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.add_notice_handler(lambda diagnostic: sink.note(diagnostic.message_primary or ""))
        with dbapi_connection.cursor() as cursor:
            cursor.execute("LOAD 'auto_explain'")
            for name, value in (
                ("log_min_duration", f"{slow_ms}ms"),
                ("log_analyze", "on"),
                ("log_level", "notice"),
                ("log_nested_statements", "on"),
            ):
                cursor.execute(f"SET auto_explain.{name} = '{value}'")
        dbapi_connection.commit()

    event.listen(engine, "connect", load)


def run_users(service: ChatService, drain: Callable[[], None]) -> None:
    """What users do, each message's jobs (replies, summaries, pictures) run before the next message."""

    def say(user: str, words: str, chat: str = "", group: bool = False) -> None:
        message_id = str(time.time_ns())
        service.handle(
            IncomingMessage("bench", user, chat or user, message_id, words, display_name=user, is_group=group)
        )
        drain()

    for n in range(25):  # past the window: recall, rolling summaries
        say("h5", f"the storm over the bay and the lighthouse, turn {n}")
    for n in range(5):
        say("newcomer", f"hello there, tell me about the harbour {n}")
    for command in (
        "/status",
        "/memory",
        "/remember I am afraid of storms",
        "/characters",
        "/use Other",
        "hi",
        "/use Bench",
        "/imagine a lighthouse at dusk",
        "/regenerate",
        "send me a selfie",
        "/reset",
        "/persona A sailor",
        "/forget all",
        "/help",
    ):
        say("h7", command)
    for user in ("g1", "g2", "g3"):
        for n in range(4):
            say(user, f"in the group, about the festival {n}", chat="group1", group=True)
    say("h9", "ahoy")  # the chat exists from here on, history or not
    with service.sessionmaker.begin() as session:
        session.execute(
            text("UPDATE chats SET image_policy = 'auto' WHERE platform = 'bench' AND platform_chat_id = 'h9'")
        )
    for n in range(5):
        say("h9", f"the map of the isles {n}")
    say("h11", "remember the festival")
    say("h11", "/forget me confirm")


def run_users_in_process(settings: Settings, watch: Callable[[Engine], None] = lambda _engine: None) -> None:
    """:func:`run_users` against ``settings``' database, each job run at once in this process on the zero-cost
    model; ``watch`` gets the engine first, to listen to its connections."""
    from tests.doubles import EchoModel
    from workers.context import context_from_settings
    from workers.shared_model import SharedModel
    from workers.tasks import execute

    queued: list[int] = []

    def send(job_id: int, _kind: JobKind) -> None:
        queued.append(job_id)

    context = context_from_settings(settings, SharedModel(EchoModel), send)
    engine = context.sessionmaker.kw["bind"]
    watch(engine)
    engine.dispose()  # the connection the context read the database's name on was opened before the watch

    def drain() -> None:
        while queued:
            execute(context, queued.pop(0))

    try:
        run_users(ChatService(context.sessionmaker, settings, send), drain)
    finally:
        engine.dispose()
        context.redis.close()


def measure(database_url: str, redis_url: str, folder: Path, users: int, slow_ms: int) -> tuple[SlowStatements, float]:
    """Fill the database, then run the users against it; returns the slow statements and the seconds filling took."""
    upgrade(database_url)
    started = time.perf_counter()
    fill(engine := make_engine(database_url), users)
    engine.dispose()
    filled_s = time.perf_counter() - started
    settings = Settings(
        _env_file=None, data_dir=folder, database_url=database_url, redis_url=redis_url, log_level="WARNING"
    )  # type: ignore[call-arg]
    slow = SlowStatements()
    run_users_in_process(settings, lambda engine: explain_slow(engine, slow_ms, slow))
    return slow, filled_s


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--users", type=at_least(1), default=20000, help="users in the history, each with a 20-turn chat"
    )
    parser.add_argument("--slow-ms", type=at_least(0), default=1, help="report statements slower than this (whole ms)")
    parser.add_argument("--plans", action="store_true", help="print each slow statement's slowest plan")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder, postgres_database() as database_url:
        with private_redis(Settings(_env_file=None, data_dir=Path(folder), redis_url=unused_redis_url())) as redis_url:
            slow, filled_s = measure(database_url, redis_url, Path(folder), args.users, args.slow_ms)
    print(f"history: {args.users} users, {args.users * _TURNS} turns (filled in {filled_s:.0f} s)")
    print(f"statements slower than {args.slow_ms} ms: {len(slow.seen)}")
    for statement, (count, slowest, plan) in sorted(slow.seen.items(), key=lambda item: -item[1][1]):
        print(f"- {slowest:.1f} ms (slow {count}x): {statement[:150]}")
        if args.plans:
            print("\n".join(f"      {line}" for line in plan.splitlines()[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
