"""Repositories: get-or-create under concurrent first messages, character resolution order, history windows."""

from __future__ import annotations

import threading

from core.db import repositories as repo
from core.db.models import Character, User
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
