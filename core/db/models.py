"""SQLAlchemy 2.0 typed models: the SQL store every process shares.

The job row is the truth: a frontend writes the user's message and a ``Job`` in one transaction; workers move the
job through its states and write the reply; frontends record what they delivered (``Job.delivered_at`` and the
platform message ids) so that a restart never posts a reply twice. Large collections (a conversation's messages)
are ``WriteOnlyMapped`` so they are queried, never loaded whole.
"""

from __future__ import annotations

import datetime as dt
import secrets
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, WriteOnlyMapped, mapped_column, relationship

from core.jobs import JobKind, JobState

__all__ = [
    "Base",
    "utcnow",
    "User",
    "Chat",
    "Character",
    "ReferenceImage",
    "Conversation",
    "Message",
    "Job",
    "Memory",
    "MessageTerm",
    "CharacterSubmission",
    "SubmissionImage",
    "TrainingJob",
    "AuditEntry",
    "Notification",
    "Installation",
]

# Named constraints, so that Alembic migrations are reproducible on SQLite and PostgreSQL alike.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids.
Id = BigInteger().with_variant(Integer(), "sqlite")


def _str_enum(cls: type) -> Enum:
    """A string enum stored by value in a VARCHAR (no native ENUM type to migrate)."""
    return Enum(cls, native_enum=False, length=16, values_callable=lambda e: [m.value for m in e])


def utcnow() -> dt.datetime:
    """Timezone-aware now, the one clock every row uses."""
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, dt.datetime: DateTime(timezone=True)}


class User(Base):
    """One identity on one platform (a Telegram user and a Discord user are two rows)."""

    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("platform", "platform_user_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    platform: Mapped[str] = mapped_column(String(16))
    platform_user_id: Mapped[str] = mapped_column(String(64))
    display_name: Mapped[str] = mapped_column(String(128), default="")
    persona: Mapped[str] = mapped_column(Text, default="")  # who the user is, as they told the characters
    # use_alter: users and characters refer to each other, so this key is added after both tables exist
    active_character_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("characters.id", ondelete="SET NULL", use_alter=True)
    )
    blocked_bot: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"User(id={self.id}, {self.platform}:{self.platform_user_id})"


class Chat(Base):
    """A place messages arrive: a DM, a group, a channel or thread, with its per-chat settings."""

    __tablename__ = "chats"
    __table_args__ = (UniqueConstraint("platform", "platform_chat_id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    platform: Mapped[str] = mapped_column(String(16))
    platform_chat_id: Mapped[str] = mapped_column(String(64))
    is_group: Mapped[bool] = mapped_column(Boolean, default=False)
    active_character_id: Mapped[Optional[int]] = mapped_column(ForeignKey("characters.id", ondelete="SET NULL"))
    image_policy: Mapped[Optional[str]] = mapped_column(String(16))  # never | on_request | auto; None: card default
    nsfw_allowed: Mapped[bool] = mapped_column(Boolean, default=False)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    def __repr__(self) -> str:
        return f"Chat(id={self.id}, {self.platform}:{self.platform_chat_id})"


class Character(Base):
    """A character: persona and card fields, reference images and, once trained, an adapter."""

    __tablename__ = "characters"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    description: Mapped[str] = mapped_column(Text, default="")  # the persona
    greeting: Mapped[str] = mapped_column(Text, default="")
    alternate_greetings: Mapped[list[Any]] = mapped_column(default=list)
    example_dialogues: Mapped[str] = mapped_column(Text, default="")
    scenario: Mapped[str] = mapped_column(Text, default="")
    style_notes: Mapped[str] = mapped_column(Text, default="")
    card: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the imported card's other fields, kept verbatim
    status: Mapped[str] = mapped_column(String(16), default="published")  # draft | published | retired
    nsfw: Mapped[bool] = mapped_column(Boolean, default=False)
    image_policy: Mapped[str] = mapped_column(String(16), default="on_request")  # never | on_request | auto
    real_person: Mapped[bool] = mapped_column(Boolean, default=False)
    consent_attested: Mapped[bool] = mapped_column(Boolean, default=False)
    avatar_key: Mapped[Optional[str]] = mapped_column(String(80))
    adapter_key: Mapped[Optional[str]] = mapped_column(String(200))
    adapter_version: Mapped[int] = mapped_column(Integer, default=0)
    creator_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    reference_images: Mapped[list[ReferenceImage]] = relationship(
        back_populates="character", cascade="all, delete-orphan", order_by="ReferenceImage.position"
    )

    def __repr__(self) -> str:
        return f"Character(id={self.id}, name={self.name!r})"


class ReferenceImage(Base):
    """One of a character's reference images, stored in the file store."""

    __tablename__ = "reference_images"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    character_id: Mapped[int] = mapped_column(ForeignKey("characters.id", ondelete="CASCADE"), index=True)
    file_key: Mapped[str] = mapped_column(String(80))
    position: Mapped[int] = mapped_column(Integer, default=0)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    caption: Mapped[str] = mapped_column(Text, default="")

    character: Mapped[Character] = relationship(back_populates="reference_images")


class Conversation(Base):
    """A user talking with a character in one chat; /reset closes it and a new one starts."""

    __tablename__ = "conversations"
    __table_args__ = (
        Index("ix_conversations_lookup", "user_id", "character_id", "chat_id", "active"),
        Index("ix_conversations_chat", "chat_id", "character_id"),  # a group chat's window, a chat's deletion
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    character_id: Mapped[int] = mapped_column(ForeignKey("characters.id", ondelete="CASCADE"))
    chat_id: Mapped[int] = mapped_column(ForeignKey("chats.id", ondelete="CASCADE"))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    messages: WriteOnlyMapped[Message] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="Message.id"
    )


class Message(Base):
    """One turn: the user's words or the character's reply, with image references and platform ids."""

    __tablename__ = "messages"
    __table_args__ = (
        Index("ix_messages_conversation", "conversation_id", "id"),
        Index("ix_messages_chat", "chat_id", "id"),  # a chat's recent turns: recall indexing, picture spacing
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    chat_id: Mapped[int] = mapped_column(ForeignKey("chats.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))  # user | character | system
    text: Mapped[str] = mapped_column(Text, default="")
    image_keys: Mapped[list[Any]] = mapped_column(default=list)
    platform_message_id: Mapped[Optional[str]] = mapped_column(String(64))
    platform_reply_ids: Mapped[list[Any]] = mapped_column(default=list)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Job(Base):
    """One unit of worker work; the row, not the Celery task, is the truth about it."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_state_kind", "state", "kind", "id"),  # the queue: position, the sweeper
        # a user's open jobs are counted at every message, a conversation's open summary looked up at every reply:
        # both must stay a few index entries however long the history grows
        Index("ix_jobs_user_state", "user_id", "state"),
        Index("ix_jobs_conversation_kind", "conversation_id", "kind"),
        # deleting a message (/forget, a user forgotten) clears these references: without an index, one scan of
        # every job for each message deleted
        Index("ix_jobs_request_message", "request_message_id"),
        Index("ix_jobs_reply_message", "reply_message_id"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    kind: Mapped[JobKind] = mapped_column(_str_enum(JobKind))
    state: Mapped[JobState] = mapped_column(_str_enum(JobState), default=JobState.QUEUED)
    user_id: Mapped[Optional[int]] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    conversation_id: Mapped[Optional[int]] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    request_message_id: Mapped[Optional[int]] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"))
    reply_message_id: Mapped[Optional[int]] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)  # prompt, seed and sampler settings
    result: Mapped[dict[str, Any]] = mapped_column(default=dict)  # image keys, seed, gpu seconds, report
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[Optional[str]] = mapped_column(Text)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[dt.datetime] = mapped_column(default=utcnow)  # last (re-)send to the broker
    started_at: Mapped[Optional[dt.datetime]]
    finished_at: Mapped[Optional[dt.datetime]]
    delivered_at: Mapped[Optional[dt.datetime]]  # when a frontend finished posting the result
    delivery: Mapped[dict[str, Any]] = mapped_column(default=dict)  # the frontend's platform message ids

    def __repr__(self) -> str:
        return f"Job(id={self.id}, kind={self.kind}, state={self.state})"


class Memory(Base):
    """Something a character remembers about a user: a summary, a pinned or extracted fact."""

    __tablename__ = "memories"
    __table_args__ = (
        Index("ix_memories_owner", "user_id", "character_id", "kind"),
        Index("ix_memories_conversation", "conversation_id", "kind"),  # every reply reads its summary
        Index("ix_memories_chat", "chat_id"),  # a forgotten user's private chat takes its facts along
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    character_id: Mapped[int] = mapped_column(ForeignKey("characters.id", ondelete="CASCADE"))
    conversation_id: Mapped[Optional[int]] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    chat_id: Mapped[Optional[int]] = mapped_column(ForeignKey("chats.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # summary | pinned | extracted
    text: Mapped[str] = mapped_column(Text)
    covers_until_message_id: Mapped[Optional[int]] = mapped_column(BigInteger)  # summaries: last message covered
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class MessageTerm(Base):
    """One posting of the recall index (core.memory): a term of a message, its count and the message's length.

    Every indexed message also has a posting with the empty term: the index's own record of what it holds.
    ``chat_id`` and ``conversation_id`` copy the message's, for the covering lookup; the message's foreign key
    guards them (deleting a chat or conversation deletes its messages, and so their postings), so they carry none
    of their own: two more checks on each of a reply's ~25 postings cost a tenth of PostgreSQL's time a reply.
    """

    __tablename__ = "message_terms"
    __table_args__ = (
        # covering: recall reads postings from the index alone
        Index("ix_message_terms_lookup", "chat_id", "term", "message_id", "conversation_id", "count", "length"),
    )

    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True)
    term: Mapped[str] = mapped_column(String(64), primary_key=True)
    chat_id: Mapped[int] = mapped_column(Id)
    conversation_id: Mapped[int] = mapped_column(Id)
    count: Mapped[int] = mapped_column(Integer)
    length: Mapped[int] = mapped_column(Integer)  # terms in the whole message (BM25 length normalisation)


class CharacterSubmission(Base):
    """A community /newcharacter request, from the first step of the dialog to the published character."""

    __tablename__ = "character_submissions"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    platform_chat_id: Mapped[str] = mapped_column(String(64), default="")  # where to tell the submitter
    # collecting -> pending -> approved -> training -> published | rejected | cancelled | failed | withdrawn
    state: Mapped[str] = mapped_column(String(16), default="collecting")
    step: Mapped[str] = mapped_column(String(16), default="name")  # the /newcharacter dialog's step
    name: Mapped[str] = mapped_column(String(64), default="")
    description: Mapped[str] = mapped_column(Text, default="")
    greeting: Mapped[str] = mapped_column(Text, default="")
    example_dialogues: Mapped[str] = mapped_column(Text, default="")  # optional, card convention (<START> blocks)
    real_person: Mapped[bool] = mapped_column(Boolean, default=False)
    consent_attested: Mapped[bool] = mapped_column(Boolean, default=False)
    consent_text: Mapped[str] = mapped_column(Text, default="")
    reason: Mapped[str] = mapped_column(Text, default="")  # a rejection's reason, or a failure's
    character_id: Mapped[Optional[int]] = mapped_column(ForeignKey("characters.id", ondelete="SET NULL"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    images: Mapped[list[SubmissionImage]] = relationship(
        back_populates="submission", cascade="all, delete-orphan", order_by="SubmissionImage.position"
    )


class SubmissionImage(Base):
    """One validated image of a submission, with its perceptual hash for duplicate checks."""

    __tablename__ = "submission_images"
    __table_args__ = (UniqueConstraint("submission_id", "file_key"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("character_submissions.id", ondelete="CASCADE"))
    file_key: Mapped[str] = mapped_column(String(80))
    phash: Mapped[str] = mapped_column(String(32))
    position: Mapped[int] = mapped_column(Integer, default=0)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)

    submission: Mapped[CharacterSubmission] = relationship(back_populates="images")


class TrainingJob(Base):
    """Training of one submission's adapter: progress, checkpoints, evaluation report."""

    __tablename__ = "training_jobs"
    __table_args__ = (Index("ix_training_jobs_job", "job_id"),)  # a forgotten user's jobs unlink their trainings

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    submission_id: Mapped[int] = mapped_column(ForeignKey("character_submissions.id", ondelete="CASCADE"))
    job_id: Mapped[Optional[int]] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    state: Mapped[str] = mapped_column(String(16), default="queued")  # queued | annotating | training | ...
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int] = mapped_column(Integer, default=0)
    loss: Mapped[Optional[float]] = mapped_column(Float)
    eta_s: Mapped[Optional[float]] = mapped_column(Float)
    work_dir: Mapped[str] = mapped_column(String(300), default="")
    checkpoint_key: Mapped[Optional[str]] = mapped_column(String(300))
    adapter_key: Mapped[Optional[str]] = mapped_column(String(300))
    report: Mapped[dict[str, Any]] = mapped_column(default=dict)
    config: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow, onupdate=utcnow)


class AuditEntry(Base):
    """An admin action, kept for accountability."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    actor: Mapped[str] = mapped_column(String(96))  # platform:user_id
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(96))
    detail: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Notification(Base):
    """A message for a user about their submission, delivered once by the bot of their platform."""

    __tablename__ = "notifications"
    __table_args__ = (
        Index("ix_notifications_pending", "platform", "delivered_at", "id"),
        Index("ix_notifications_submission", "submission_id"),  # a forgotten user's submissions take theirs along
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    platform: Mapped[str] = mapped_column(String(16))
    platform_chat_id: Mapped[str] = mapped_column(String(64), default="")
    submission_id: Mapped[Optional[int]] = mapped_column(ForeignKey("character_submissions.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))  # submitted | approved | rejected | progress | published | ...
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[Optional[dt.datetime]]

    def __repr__(self) -> str:
        return f"Notification(id={self.id}, kind={self.kind!r}, user_id={self.user_id})"


class Installation(Base):
    """The one row that names this database: a random token drawn when its tables were created.

    What goes through Redis by row id carries it (``core.db.installation``): a database created again, with the
    same ids, never reads the streams the previous one left behind, nor runs its job messages.
    """

    __tablename__ = "installation"
    __table_args__ = (CheckConstraint("id = 1", name="one_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


@event.listens_for(Installation.__table__, "after_create")
def _name_new_database(table: Any, connection: Any, **_kw: Any) -> None:
    """``create_all`` names the database as the migration does (tests and scripts create tables that way)."""
    connection.execute(table.insert().values(id=1, token=secrets.token_hex(8)))  # 64 random bits, as migration 0002
