"""Small typed queries over the SQL store; each takes the caller's ``Session`` and never commits.

Get-or-create of platform identities survives two first messages racing: the insert runs in a savepoint and a
unique-constraint loss falls back to reading the winner's row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from sqlalchemy import ColumnElement, Select, bindparam, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db.models import Character, Chat, Conversation, Job, Message, User, utcnow
from core.jobs import TERMINAL_STATES, JobKind, JobState

__all__ = [
    "get_or_create_user",
    "get_or_create_chat",
    "published_characters",
    "character_by_name",
    "resolve_character",
    "active_conversation",
    "close_conversation",
    "add_message",
    "recent_messages",
    "create_job",
    "count_open_jobs",
    "open_jobs",
]

_Row = TypeVar("_Row", User, Chat)


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


def active_conversation(session: Session, user_id: int, character_id: int, chat_id: int) -> Conversation:
    """The open conversation of this user with this character in this chat, started when there is none."""
    params = {"user_id": user_id, "character_id": character_id, "chat_id": chat_id}
    conversation = session.scalars(_ACTIVE_CONVERSATION, params).first()
    if conversation is None:
        conversation = Conversation(user_id=user_id, character_id=character_id, chat_id=chat_id, active=True)
        session.add(conversation)
        session.flush()
    return conversation


def close_conversation(session: Session, user_id: int, character_id: int, chat_id: int) -> int:
    """Close the open conversations of this user, character and chat; returns how many were open."""
    result = session.execute(
        update(Conversation)
        .filter_by(user_id=user_id, character_id=character_id, chat_id=chat_id, active=True)
        .values(active=False)
    )
    return result.rowcount or 0


def add_message(
    session: Session,
    conversation: Conversation,
    role: str,
    text: str,
    image_keys: Sequence[str] = (),
    platform_message_id: str | None = None,
) -> Message:
    """Append a turn to ``conversation`` and give it an id."""
    message = Message(
        conversation_id=conversation.id,
        chat_id=conversation.chat_id,
        role=role,
        text=text,
        image_keys=list(image_keys),
        platform_message_id=platform_message_id,
    )
    session.add(message)
    session.flush()
    return message


def recent_messages(session: Session, conversation_id: int, limit: int, before_id: int | None = None) -> list[Message]:
    """The last ``limit`` turns of a conversation (up to and including ``before_id``), oldest first."""
    query = select(Message).where(Message.conversation_id == conversation_id)
    if before_id is not None:
        query = query.where(Message.id <= before_id)
    rows = session.scalars(query.order_by(Message.id.desc()).limit(limit)).all()
    return list(reversed(rows))


def create_job(
    session: Session,
    kind: JobKind,
    user_id: int | None,
    conversation_id: int | None = None,
    request_message_id: int | None = None,
    params: dict[str, object] | None = None,
) -> Job:
    """A queued job row with its id assigned; the caller dispatches it after commit."""
    now = utcnow()
    job = Job(
        kind=kind,
        state=JobState.QUEUED,
        user_id=user_id,
        conversation_id=conversation_id,
        request_message_id=request_message_id,
        params=dict(params or {}),
        created_at=now,
        queued_at=now,
    )
    session.add(job)
    session.flush()
    return job


USER_KINDS = (JobKind.CHAT, JobKind.IMAGE)  # what users ask for; summaries and training run on their behalf


def _waiting_for(user_id: int) -> ColumnElement[bool]:
    return (Job.user_id == user_id) & Job.kind.in_(USER_KINDS) & Job.state.not_in(list(TERMINAL_STATES))


_COUNT_OPEN = select(func.count()).select_from(Job).where(_waiting_for(bindparam("user_id")))  # type: ignore[arg-type]


def count_open_jobs(session: Session, user_id: int) -> int:
    """How many replies and pictures the user is waiting for."""
    return int(session.scalar(_COUNT_OPEN, {"user_id": user_id}) or 0)


def open_jobs(session: Session, user_id: int) -> Sequence[Job]:
    """A user's replies and pictures that are not finished, oldest first."""
    return session.scalars(select(Job).where(_waiting_for(user_id)).order_by(Job.id)).all()
