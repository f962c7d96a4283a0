"""Repositories: get-or-create under concurrent first messages, character resolution order, history windows."""

from __future__ import annotations

import threading

from sqlalchemy import insert, select

from core.db import repositories as repo
from core.db.models import Character, User
from core.db.session import reading, single_statements
from core.jobs import JobKind
from tests.conftest import count_rows
from tests.factories import add_character


def test_concurrent_first_messages_make_one_user(any_sessionmaker):
    ids, barrier = [], threading.Barrier(6)

    def first_contact() -> None:
        barrier.wait()
        with any_sessionmaker.begin() as session:
            ids.append(repo.get_or_create_user(session, "telegram", "42", "Ada").id)

    threads = [threading.Thread(target=first_contact) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(ids)) == 1 and len(ids) == 6
    assert count_rows(any_sessionmaker, User) == {"users": 1}


def test_character_resolution_order(sessionmaker):
    first, second, third = (add_character(sessionmaker, name) for name in ("Ann", "Ben", "Cid"))
    add_character(sessionmaker, "Dee", status="draft")
    with sessionmaker.begin() as session:
        user = repo.get_or_create_user(session, "discord", "1")
        chat = repo.get_or_create_chat(session, "discord", "9", is_group=True)
        assert repo.resolve_character(session, user, chat).id == first
        assert repo.resolve_character(session, user, chat, default_name="cid").id == third
        assert repo.resolve_character(session, user, chat, default_name="Dee").id == first  # drafts are not picked
        user.active_character_id = second
        assert repo.resolve_character(session, user, chat, default_name="cid").id == second
        chat.active_character_id = third
        assert repo.resolve_character(session, user, chat).id == third
        session.get(Character, third).status = "retired"
        assert repo.resolve_character(session, user, chat).id == second


def test_recent_messages_window(sessionmaker):
    add_character(sessionmaker)
    with sessionmaker.begin() as session:
        user = repo.get_or_create_user(session, "console", "me")
        chat = repo.get_or_create_chat(session, "console", "me")
        conversation = repo.active_conversation(session, user.id, 1, chat.id)
        ids = [repo.add_message(session, conversation, "user", str(n)).id for n in range(6)]
        assert [m.text for m in repo.recent_messages(session, conversation.id, 3)] == ["3", "4", "5"]
        assert [m.text for m in repo.recent_messages(session, conversation.id, 2, before_id=ids[2])] == ["1", "2"]
        assert repo.close_conversation(session, user.id, 1, chat.id) == 1
        assert repo.active_conversation(session, user.id, 1, chat.id).id != conversation.id


def test_resolve_turn_reads_what_storing_a_message_needs_in_one_statement(sessionmaker):
    first, second = add_character(sessionmaker, "Ann"), add_character(sessionmaker, "Ben")
    with sessionmaker.begin() as session:
        assert repo.resolve_turn(session, "discord", "1", "9", JobKind.CHAT) is None  # first contact
        user = repo.get_or_create_user(session, "discord", "1", "Ada")
        chat = repo.get_or_create_chat(session, "discord", "9")
        session.flush()
        turn = repo.resolve_turn(session, "discord", "1", "9", JobKind.CHAT, default_name=" ben ")
        assert (turn.user_id, turn.display_name, turn.chat_id) == (user.id, "Ada", chat.id)
        assert (turn.character_id, turn.character_name, turn.conversation_id) == (second, "Ben", None)
        assert (turn.open_jobs, turn.queued) == (0, 0)
        user.active_character_id = first
        session.flush()
        conversation_id = repo.start_conversation(session, user.id, first, chat.id)
        repo.insert_job(session, JobKind.CHAT, user.id, conversation_id)
        repo.insert_job(session, JobKind.IMAGE, None)  # another user's picture: the image queue, not the chat's
        turn = repo.resolve_turn(session, "discord", "1", "9", JobKind.CHAT, default_name="ben")
        assert (turn.character_id, turn.conversation_id, turn.open_jobs, turn.queued) == (first, conversation_id, 1, 1)
        assert repo.resolve_turn(session, "discord", "1", "9", JobKind.IMAGE).queued == 1
        session.get(Character, first).status = "retired"  # resolved as resolve_character does
        session.flush()
        turn = repo.resolve_turn(session, "discord", "1", "9", JobKind.CHAT)
        assert turn.character_id == repo.resolve_character(session, user, chat).id == second


def test_a_turn_for_a_vanished_conversation_is_not_stored(sessionmaker):
    add_character(sessionmaker)
    with sessionmaker.begin() as session:
        user = repo.get_or_create_user(session, "console", "me")
        chat = repo.get_or_create_chat(session, "console", "me")
        conversation_id = repo.start_conversation(session, user.id, 1, chat.id)
        assert repo.insert_message(session, conversation_id, "user", "hi") is not None
        assert repo.insert_message(session, conversation_id + 1, "character", "lost") is None


def test_light_units_of_work_leave_pooled_connections_transactional(any_sessionmaker):
    with single_statements(any_sessionmaker) as connection:  # each statement commits on its own (PostgreSQL)
        connection.execute(insert(User.__table__).values(platform="console", platform_user_id="kept"))
    with reading(any_sessionmaker) as session:
        assert session.scalar(select(User.platform_user_id)) == "kept"
    with any_sessionmaker() as session:  # the same pooled connection: a rollback must still undo
        session.add(User(platform="console", platform_user_id="undone"))
        session.flush()
        session.rollback()
    assert count_rows(any_sessionmaker, User) == {"users": 1}
