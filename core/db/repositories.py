"""Small typed queries over the SQL store; each takes the caller's ``Session`` and never commits.

Get-or-create of platform identities survives two first messages racing: the insert runs in a savepoint and a
unique-constraint loss falls back to reading the winner's row. The message path's statements (``resolve_turn``,
``insert_message``, ``insert_job``) run on the tables through SQLAlchemy Core, built once: the ORM's unit of work
and result loading cost more than the statements themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import (
    ColumnElement,
    Select,
    bindparam,
    func,
    insert,
    select,
    true,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db.models import Character, Chat, Conversation, Job, Message, User, utcnow
from core.db.prepared import Prepared
from core.jobs import QUEUE_OF_KIND, TERMINAL_STATES, JobKind, JobState

__all__ = [
    "Turn",
    "active_conversation",
    "add_message",
    "character_by_name",
    "close_conversation",
    "count_open_jobs",
    "create_job",
    "get_or_create_chat",
    "get_or_create_user",
    "insert_job",
    "insert_message",
    "open_jobs",
    "published_characters",
    "recent_messages",
    "rename_user",
    "resolve_character",
    "resolve_turn",
    "start_conversation",
]

_Row = TypeVar("_Row", User, Chat)
USER_KINDS = (JobKind.CHAT, JobKind.IMAGE)  # what users ask for; summaries and training run on their behalf


def _by_identity(model: type[_Row], key: str) -> Select[tuple[_Row]]:
    """The row of a platform identity: bound ``platform`` and ``key``."""
    return select(model).where(model.platform == bindparam("platform"), getattr(model, key) == bindparam(key))


# Statements built once (building one costs about as much as running it); the callers bind the values.
_LOOKUPS: dict[type, Select] = {  # type: ignore[type-arg]
    User: _by_identity(User, "platform_user_id"),
    Chat: _by_identity(Chat, "platform_chat_id"),
}
_FIRST_PUBLISHED = select(Character).where(Character.status == "published").order_by(Character.id).limit(1)
_BY_NAME = select(Character).where(func.lower(Character.name) == bindparam("name"), Character.status == "published")
_ACTIVE_CONVERSATION = (
    select(Conversation)
    .where(
        Conversation.user_id == bindparam("user_id"),
        Conversation.character_id == bindparam("character_id"),
        Conversation.chat_id == bindparam("chat_id"),
        Conversation.active.is_(True),
    )
    .order_by(Conversation.id.desc())
    .limit(1)
)


def _get_or_insert(session: Session, model: type[_Row], lookup: dict[str, object], extra: dict[str, object]) -> _Row:
    """The row matching ``lookup``, inserted (with ``extra``) when missing, even under a concurrent insert."""
    query = _LOOKUPS[model]
    row = session.scalars(query, lookup).one_or_none()
    if row is not None:
        return row
    try:
        with session.begin_nested():
            row = model(**lookup, **extra)
            session.add(row)
    except IntegrityError:  # another process inserted it first
        row = session.scalars(query, lookup).one()
    return row


def get_or_create_user(session: Session, platform: str, platform_user_id: str, display_name: str = "") -> User:
    """The user of this platform identity; its display name follows the platform's latest one."""
    user = _get_or_insert(
        session, User, {"platform": platform, "platform_user_id": platform_user_id}, {"display_name": display_name}
    )
    if display_name and user.display_name != display_name:
        user.display_name = display_name
    return user


def get_or_create_chat(session: Session, platform: str, platform_chat_id: str, is_group: bool = False) -> Chat:
    """The chat (DM, group, channel) of this platform id."""
    return _get_or_insert(
        session, Chat, {"platform": platform, "platform_chat_id": platform_chat_id}, {"is_group": is_group}
    )


def published_characters(session: Session) -> Sequence[Character]:
    """Characters users can pick, in creation order."""
    return session.scalars(select(Character).where(Character.status == "published").order_by(Character.id)).all()


def character_by_name(session: Session, name: str) -> Character | None:
    """The published character called ``name``, ignoring case and surrounding spaces."""
    return session.scalars(_BY_NAME, {"name": name.strip().lower()}).first()


def _published(session: Session, character_id: int | None) -> Character | None:
    character = session.get(Character, character_id) if character_id is not None else None
    return character if character is not None and character.status == "published" else None


def resolve_character(session: Session, user: User, chat: Chat, default_name: str = "") -> Character | None:
    """The character to talk to: the chat's, else the user's, else ``default_name``, else the first published."""
    return (
        _published(session, chat.active_character_id)
        or _published(session, user.active_character_id)
        or (character_by_name(session, default_name) if default_name else None)
        or session.scalars(_FIRST_PUBLISHED).first()
    )


class Turn(NamedTuple):
    """What storing one incoming message needs, read in one statement (``resolve_turn``)."""

    user_id: int
    display_name: str
    chat_id: int
    character_id: int | None  # None: no character is published
    character_name: str | None
    conversation_id: int | None  # None: no open conversation with that character here yet
    open_jobs: int  # the user's replies and pictures not finished
    queued: int  # jobs waiting in the queue a new job of the asked kind joins


def _new_message_statement() -> Any:
    """INSERT a turn into the conversation's chat, SELECTing nothing (no row, no error) once the conversation is gone."""
    messages, conversations = Message.__table__.c, Conversation.__table__.c
    columns = ("role", "text", "image_keys", "platform_message_id", "platform_reply_ids", "created_at")
    source = select(
        conversations.id, conversations.chat_id, *(bindparam(name, type_=messages[name].type) for name in columns)
    ).where(conversations.id == bindparam("conversation_id"))
    target = ["conversation_id", "chat_id", *columns]
    return insert(Message.__table__).from_select(target, source).returning(messages.id)


def _turn_statement(queue: str) -> Select[Any]:
    """Users x chats by platform ids, with ``resolve_character``'s choice, the conversation and the job counts."""
    users, chats, characters = User.__table__.c, Chat.__table__.c, Character.__table__.c
    conversations, jobs = Conversation.__table__.c, Job.__table__.c

    def published(*where: ColumnElement[bool]) -> Any:
        return select(characters.id).where(*where, characters.status == "published").order_by(characters.id).limit(1)

    identity = (
        select(
            users.id.label("user_id"),
            users.display_name,
            chats.id.label("chat_id"),
            func.coalesce(  # the order of resolve_character
                published(characters.id == chats.active_character_id).scalar_subquery(),
                published(characters.id == users.active_character_id).scalar_subquery(),
                published(func.lower(characters.name) == bindparam("default_name")).scalar_subquery(),
                published().scalar_subquery(),
            ).label("character_id"),
        )
        .select_from(User.__table__.join(Chat.__table__, true()))  # one user row by one chat row
        .where(
            users.platform == bindparam("platform"),
            users.platform_user_id == bindparam("platform_user_id"),
            chats.platform == bindparam("platform"),
            chats.platform_chat_id == bindparam("platform_chat_id"),
        )
        .offset(0)  # kept a subquery: merged, its character choice would be planned once per use (three)
        .subquery()
    )
    return select(
        identity.c.user_id,
        identity.c.display_name,
        identity.c.chat_id,
        identity.c.character_id,
        select(characters.name).where(characters.id == identity.c.character_id).scalar_subquery(),
        select(conversations.id)
        .where(
            conversations.user_id == identity.c.user_id,
            conversations.character_id == identity.c.character_id,
            conversations.chat_id == identity.c.chat_id,
            conversations.active.is_(True),
        )
        .order_by(conversations.id.desc())
        .limit(1)
        .scalar_subquery(),
        select(func.count())
        .where(
            jobs.user_id == identity.c.user_id,
            jobs.kind.in_(USER_KINDS),
            jobs.state.in_([state for state in JobState if state not in TERMINAL_STATES]),
        )
        .scalar_subquery(),
        select(func.count())
        .where(jobs.state == JobState.QUEUED, jobs.kind.in_([k for k, q in QUEUE_OF_KIND.items() if q == queue]))
        .scalar_subquery(),
    )


def resolve_turn(
    session: Session, platform: str, platform_user_id: str, platform_chat_id: str, kind: JobKind,
    default_name: str = "",
) -> Turn | None:
    """Everything a new message of ``kind`` needs, in one statement; None when the user or the chat is new.

    Read in the transaction that stores the message, so it is never stale: nothing is cached between messages.
    """
    params = {
        "platform": platform,
        "platform_user_id": platform_user_id,
        "platform_chat_id": platform_chat_id,
        "default_name": default_name.strip().lower() or None,  # NULL matches no name
    }
    row = _TURN[QUEUE_OF_KIND[kind]].first(session, params)
    return Turn(*row) if row is not None else None


def rename_user(session: Session, user_id: int, display_name: str) -> None:
    """Follow the platform's latest display name."""
    session.execute(_RENAME, {"user_id": user_id, "new_name": display_name})


def start_conversation(session: Session, user_id: int, character_id: int, chat_id: int) -> int:
    """A new open conversation; returns its id."""
    values = {"user_id": user_id, "character_id": character_id, "chat_id": chat_id, "active": True}
    return int(session.execute(_NEW_CONVERSATION, values).inserted_primary_key[0])


def active_conversation(session: Session, user_id: int, character_id: int, chat_id: int) -> Conversation:
    """The open conversation of this user with this character in this chat, started when there is none."""
    params = {"user_id": user_id, "character_id": character_id, "chat_id": chat_id}
    conversation = session.scalars(_ACTIVE_CONVERSATION, params).first()
    if conversation is None:
        session.flush()
        conversation = session.get_one(Conversation, start_conversation(session, user_id, character_id, chat_id))
    return conversation


def close_conversation(session: Session, user_id: int, character_id: int, chat_id: int) -> int:
    """Close the open conversations of this user, character and chat; returns how many were open."""
    result = session.execute(
        update(Conversation)
        .filter_by(user_id=user_id, character_id=character_id, chat_id=chat_id, active=True)
        .values(active=False)
    )
    return result.rowcount or 0


def insert_message(
    session: Session,
    conversation_id: int,
    role: str,
    text: str,
    image_keys: Sequence[str] = (),
    platform_message_id: str | None = None,
) -> int | None:
    """Append a turn to a conversation; returns its id, or None when the conversation no longer exists."""
    values = {
        "conversation_id": conversation_id,
        "role": role,
        "text": text,
        "image_keys": list(image_keys),
        "platform_message_id": platform_message_id,
        "platform_reply_ids": [],
        "created_at": utcnow(),
    }
    return _NEW_MESSAGE.scalar(session, values)  # type: ignore[no-any-return]


def add_message(
    session: Session,
    conversation: Conversation,
    role: str,
    text: str,
    image_keys: Sequence[str] = (),
    platform_message_id: str | None = None,
) -> Message:
    """Append a turn to ``conversation``, as an ORM row."""
    message_id = insert_message(session, conversation.id, role, text, image_keys, platform_message_id)
    if message_id is None:
        raise LookupError(f"conversation {conversation.id} no longer exists")
    return session.get_one(Message, message_id)


def recent_messages(session: Session, conversation_id: int, limit: int, before_id: int | None = None) -> list[Message]:
    """The last ``limit`` turns of a conversation (up to and including ``before_id``), oldest first."""
    query = select(Message).where(Message.conversation_id == conversation_id)
    if before_id is not None:
        query = query.where(Message.id <= before_id)
    rows = session.scalars(query.order_by(Message.id.desc()).limit(limit)).all()
    return list(reversed(rows))


def insert_job(
    session: Session,
    kind: JobKind,
    user_id: int | None,
    conversation_id: int | None = None,
    request_message_id: int | None = None,
    params: dict[str, object] | None = None,
) -> int:
    """A queued job row; returns its id. The caller dispatches it after commit."""
    now = utcnow()
    values = {
        "kind": kind,
        "state": JobState.QUEUED,
        "user_id": user_id,
        "conversation_id": conversation_id,
        "request_message_id": request_message_id,
        "params": dict(params or {}),
        "created_at": now,
        "queued_at": now,
    }
    return int(_NEW_JOB.scalar(session, values))


def create_job(
    session: Session,
    kind: JobKind,
    user_id: int | None,
    conversation_id: int | None = None,
    request_message_id: int | None = None,
    params: dict[str, object] | None = None,
) -> Job:
    """A queued job row, as an ORM row; the caller dispatches it after commit."""
    return session.get_one(Job, insert_job(session, kind, user_id, conversation_id, request_message_id, params))


def _waiting_for(user_id: int) -> ColumnElement[bool]:
    return (Job.user_id == user_id) & Job.kind.in_(USER_KINDS) & Job.state.not_in(list(TERMINAL_STATES))


_TURN = {queue: Prepared(_turn_statement(queue)) for queue in set(QUEUE_OF_KIND.values())}
_RENAME = (
    update(User.__table__)
    .where(User.__table__.c.id == bindparam("user_id"))
    .values(display_name=bindparam("new_name"))
)
_NEW_CONVERSATION = insert(Conversation.__table__)
_NEW_MESSAGE = Prepared(_new_message_statement())
_NEW_JOB = Prepared(insert(Job.__table__).returning(Job.__table__.c.id))
_COUNT_OPEN = select(func.count()).select_from(Job).where(_waiting_for(bindparam("user_id")))  # type: ignore[arg-type]


def count_open_jobs(session: Session, user_id: int) -> int:
    """How many replies and pictures the user is waiting for."""
    return int(session.scalar(_COUNT_OPEN, {"user_id": user_id}) or 0)


def open_jobs(session: Session, user_id: int) -> Sequence[Job]:
    """A user's replies and pictures that are not finished, oldest first."""
    return session.scalars(select(Job).where(_waiting_for(user_id)).order_by(Job.id)).all()
