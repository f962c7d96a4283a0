"""What a character remembers of a user: recent window, rolling summaries, facts, recall, persona; export and forget.

Everything lives in SQL and is scoped per user x character x conversation (a conversation is one user with one
character in one chat; /reset closes it). The parts:

- **Recent window**: the last ``Settings.history_messages`` turns the character heard in this chat, verbatim
  (in a direct chat, the conversation's own).
- **Rolling summary**: when ``Settings.summary_every`` turns have fallen out of the window unsummarised,
  :func:`summary_due` says so and a low-priority SUMMARY job asks the model (:func:`summary_request`) for an updated
  summary plus lasting facts about the user, stored by :func:`store_summary`. Never in the path of a reply.
- **Facts**: pinned by the user (/remember) for one character across chats; extracted by the model, kept for
  the chat they were learnt in. Both outlive /reset (which starts the window and summary over); /forget
  removes them.
- **Recall**: older turns relevant to the new message, ranked by BM25 over an inverted index kept in SQL
  (``message_terms``). Lexical rather than embedding recall because role-play recall is mostly about names,
  places and objects the user mentions again, which exact terms find well; because it needs no second model on
  the GPU nor vectors in the database (PostgreSQL and SQLite alike); and because it is fast: a query reads only
  the postings of the message's rarer terms through one index, a few milliseconds for a 10,000-turn history.
  A reply indexes its own turns in its transaction (:func:`index_reply`) once the window is about to be full, so
  reading memory writes nothing; :func:`index_chat` catches a chat up (turns written by others, a window filling
  for the first time), so other writers need not know the index.
- **Presence**: a character knows only what was said where it was present. Summaries and extracted facts are
  per conversation/chat; recall reads only the current chat: in a direct chat, the current conversation; in a
  group, every open conversation there from the first turn this character took part in (it has been in the
  scene since), with whoever spoke. Nothing said in another chat, or before the character arrived, is recalled.

Chat commands (/remember, /forget, /persona, /memory) are functions taking a session and returning the text to
show the user. :func:`forget_user` deletes every row that belongs to a user, following the schema's foreign keys,
and the user's files once the transaction commits.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import (
    Float,
    Select,
    String,
    Table,
    bindparam,
    case,
    cast,
    delete,
    event,
    exists,
    func,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import aliased
from sqlalchemy.orm.util import identity_key

from core.db.models import (
    Base,
    Character,
    CharacterSubmission,
    Chat,
    Conversation,
    Job,
    Memory,
    Message,
    MessageTerm,
    ReferenceImage,
    SubmissionImage,
    User,
)
from core.db.prepared import Prepared
from core.jobs import TERMINAL_STATES, JobKind
from core.model.api import TextSegment
from core.wording import counted

if TYPE_CHECKING:
    from sqlalchemy.orm import Session
    from sqlalchemy.sql import ColumnElement

    from core.config import Settings
    from core.media import FileStore

__all__ = [
    "Turn",
    "MemoryContext",
    "SummaryRequest",
    "terms",
    "index_chat",
    "index_due",
    "index_reply",
    "window",
    "recall",
    "facts",
    "latest_summary",
    "memory_context",
    "note_conversation",
    "summary_due",
    "summary_request",
    "store_summary",
    "remember",
    "forget",
    "persona",
    "describe_memory",
    "export_user",
    "forget_user",
]

log = logging.getLogger(__name__)

PINNED, EXTRACTED, SUMMARY = "pinned", "extracted", "summary"
MAX_FACT_CHARS: Final = 500
MAX_FACTS: Final = 50  # per kind, per user and character; the oldest extracted facts go first
MAX_PERSONA_CHARS: Final = 1000
SUMMARY_WORDS: Final = 150
SUMMARY_REPLY_TOKENS: Final = 400
TURN_ROLES: Final = ("user", "character")
MAX_POSTINGS: Final = 2000  # postings read per recall: the rarest query terms first
QUERY_TERMS: Final = 8  # the rarest terms of the new message that recall searches for
_NO_TERM: Final = "-"  # pads the query's terms; never a term (terms are letters and digits)
_NO_END: Final = 2**62  # a message id above every real one
RESCAN_TURNS: Final = 20  # the chat's latest turns checked again by the indexer
DOCUMENT: Final = ""  # the term every indexed message has a posting for
_FACTS_LINE = re.compile(r"(?im)^\s*facts?\s*:")
_BM25_K1, _BM25_B = 1.2, 0.75
_WORD = re.compile(r"[^\W_]+")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]+")
_STOPWORDS: Final = frozenset(
    """a an and are as at be been but by can could did do does for from had has have he her hers him his how i if
    in into is it its just me my no not of on or our she so than that the their them then there they this to too
    us was we were what when where which who why will with would you your yours am im ive dont oh ok okay yes
    yeah""".split()
)


@dataclass(frozen=True, slots=True)
class Turn:
    """One stored turn as the prompt shows it."""

    message_id: int
    role: str  # user | character
    speaker: str
    text: str


@dataclass(frozen=True, slots=True)
class MemoryContext:
    """Everything memory contributes to one reply's prompt."""

    window: list[Turn]  # oldest first
    summary: str
    pinned: list[str]
    extracted: list[str]
    recalled: list[Turn]  # most relevant first
    # turns that leave the window unsummarised once the reply is stored (at least summary_every when more);
    # None where the turns read do not tell (a group chat): summary_due then asks the database
    unsummarised: int | None = None


@dataclass(frozen=True, slots=True)
class SummaryRequest:
    """A SUMMARY job's model request: run ``segments`` and hand the text to :func:`store_summary`."""

    conversation_id: int
    segments: list[TextSegment]
    covers_until_message_id: int
    max_new_tokens: int = SUMMARY_REPLY_TOKENS


# --- the recall index ---------------------------------------------------------------------------------------


def _stem(word: str) -> str:
    """A light English plural fold, so that 'cats' finds 'cat'."""
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def terms(text: str) -> list[str]:
    """Index terms of ``text``: folded words without stop words, and character bigrams for CJK scripts."""
    out: list[str] = []
    for word in _WORD.findall(text.casefold()):
        if _CJK.fullmatch(word):
            out.extend(word[i : i + 2] for i in range(max(1, len(word) - 1)))
        elif len(word) > 1 and word not in _STOPWORDS:
            out.append(_stem(word)[:64])
    return out


def _unindexed_statement() -> Select[tuple[int, int, str]]:
    """The chat's turns after the newest indexed one, and among its last RESCAN_TURNS, that have no postings."""
    chat_id = bindparam("chat_id")
    last = (
        select(func.max(_TERMS.message_id))
        .where(_TERMS.chat_id == chat_id, _TERMS.term == DOCUMENT)
        .scalar_subquery()
    )
    recent = (
        select(_MESSAGES.id)
        .where(_MESSAGES.chat_id == chat_id)
        .order_by(_MESSAGES.id.desc())
        .offset(RESCAN_TURNS)
        .limit(1)
        .scalar_subquery()
    )
    # -1: from the chat's first turn (nothing indexed yet, or a short chat)
    bounds = select(func.coalesce(last, -1).label("last"), func.coalesce(recent, -1).label("recent")).subquery()
    floor = select(case((bounds.c.last < bounds.c.recent, bounds.c.last), else_=bounds.c.recent)).scalar_subquery()
    marker = MessageTerm.__table__.alias()
    return (
        select(_MESSAGES.id, _MESSAGES.conversation_id, _MESSAGES.text)
        .outerjoin(marker, (marker.c.message_id == _MESSAGES.id) & (marker.c.term == DOCUMENT))
        .where(
            _MESSAGES.chat_id == chat_id,
            _MESSAGES.id > floor,
            _TURN_ROLE,
            marker.c.message_id.is_(None),
        )
    )


def index_chat(session: Session, chat_id: int) -> int:
    """Index the chat's turns that are not indexed yet; returns how many were indexed.

    Reads the turns after the newest indexed one, plus the last few again: a turn committed late (a lower id
    than one already indexed) is caught that way.
    """
    rows = session.execute(_UNINDEXED, {"chat_id": chat_id}).all()
    _index(session, chat_id, rows)
    return len(rows)


def _index(session: Session, chat_id: int, rows: Iterable[tuple[int, int, str]]) -> None:
    """Postings of ``(message id, conversation id, text)`` turns of the chat; turns indexed already are skipped."""
    postings = []
    for message_id, conversation_id, text in rows:
        counts = Counter(terms(text))
        length = sum(counts.values())
        counts[DOCUMENT] = 0
        postings.extend(
            {"message_id": message_id, "term": term, "chat_id": chat_id, "conversation_id": conversation_id,
             "count": n, "length": length}
            for term, n in counts.items()
        )
    if postings:
        _insert_postings(session, postings)


def index_reply(
    session: Session,
    conversation: Conversation,
    context: MemoryContext,
    new_message: Message,
    reply_id: int | None,
    reply: str,
    settings: Settings,
) -> None:
    """In the reply's transaction, when :func:`index_due`: index what the next replies will recall.

    In a direct chat whose window is full, the earlier turns were indexed by earlier replies: only the turns
    since the last reply (the new message, and any a failed job left) and the reply itself are added, from
    text in hand, with no query. Otherwise (the window fills for the first time, or a group chat, where
    others' turns count too) the chat catches up with :func:`index_chat`.
    """
    if not index_due(context, settings):
        return
    if context.unsummarised is None or len(context.window) < settings.history_messages:  # None: a group chat
        index_chat(session, conversation.chat_id)
        return
    since = []
    for turn in reversed(context.window):
        if turn.role != "user":
            break
        since.append((turn.message_id, conversation.id, turn.text))
    since.append((new_message.id, conversation.id, new_message.text))
    if reply_id is not None:
        since.append((reply_id, conversation.id, reply))
    _index(session, conversation.chat_id, since)


# --- reading memory -----------------------------------------------------------------------------------------


_KNOWN_SPEAKERS: Final = "unichar.speakers"  # session.info: conversation id -> (user name, character name)
_KNOWN_GROUPS: Final = "unichar.group_chats"  # session.info: chat id -> whether it is a group chat


def note_conversation(session: Session, conversation: Any, chat: Any, user: Any, character: Any) -> None:
    """Tell memory what the caller read already of a conversation, in plain rows: its chat's kind and who speaks.

    Memory's reads in ``session`` then need not look them up again (as they need not for ORM rows the session
    holds). The rows need the attributes of the models they stand for.
    """
    session.info.setdefault(_KNOWN_GROUPS, {})[chat.id] = chat.is_group
    session.info.setdefault(_KNOWN_SPEAKERS, {})[conversation.id] = (user.display_name or "User", character.name)


def _speakers(session: Session, conversation_ids: Iterable[int]) -> dict[int, tuple[str, str]]:
    """(user name, character name) of each conversation, cached in the (short-lived) session."""
    known: dict[int, tuple[str, str]] = session.info.setdefault(_KNOWN_SPEAKERS, {})
    missing = set(conversation_ids) - known.keys()
    for cid in list(missing):  # the reply's own conversation: its rows are usually in the session already
        conversation = session.identity_map.get(identity_key(Conversation, cid))
        user = session.identity_map.get(identity_key(User, conversation.user_id)) if conversation else None
        character = session.identity_map.get(identity_key(Character, conversation.character_id)) if user else None
        if character is not None:
            known[cid] = (user.display_name or "User", character.name)
            missing.discard(cid)
    if missing:
        rows = session.execute(_SPEAKERS, {"ids": list(missing)}).all()
        known.update({cid: (user or "User", character) for cid, user, character in rows})
    return known


# The reply's statements name table columns: plain rows through SQLAlchemy Core, no ORM loading.
_MESSAGES, _TERMS, _MEMORIES = Message.__table__.c, MessageTerm.__table__.c, Memory.__table__.c
_CONVERSATIONS, _USERS, _CHARACTERS, _JOBS = (m.__table__.c for m in (Conversation, User, Character, Job))
_TURN_ROLE: Final = or_(*(_MESSAGES.role == role for role in TURN_ROLES))  # not IN: that is rendered per execution
_TURN_COLUMNS: Final = (_MESSAGES.id, _MESSAGES.conversation_id, _MESSAGES.role, _MESSAGES.text)


def _turns(session: Session, rows: Sequence[Any]) -> list[Turn]:
    """Turns of ``(id, conversation_id, role, text)`` rows, speakers named."""
    names = _speakers(session, {row.conversation_id for row in rows})
    return [
        Turn(row.id, row.role, names[row.conversation_id][0 if row.role == "user" else 1], row.text)
        for row in rows
        if row.role in TURN_ROLES
    ]


def _scope(session: Session, conversation: Conversation) -> tuple[list[int], int]:
    """The conversations whose turns this character heard in this chat, and the first turn it heard."""
    group = session.info.get(_KNOWN_GROUPS, {}).get(conversation.chat_id)
    if group is None:
        chat = session.get(Chat, conversation.chat_id)
        group = chat is not None and chat.is_group
    if not group:
        return [conversation.id], 0
    arrived = session.scalar(
        select(func.min(Message.id))
        .join(Conversation, Conversation.id == Message.conversation_id)
        .where(Conversation.chat_id == conversation.chat_id, Conversation.character_id == conversation.character_id)
    )
    open_ids = session.scalars(
        select(Conversation.id).where(Conversation.chat_id == conversation.chat_id, Conversation.active.is_(True))
    ).all()
    return list(open_ids), arrived or 0


def _window_rows(
    session: Session, conversation_ids: list[int], arrived: int, before_id: int | None, limit: int
) -> list[Any]:
    """The last ``limit`` turns of ``conversation_ids`` from ``arrived`` and before ``before_id``, oldest first."""
    params = {"conversations": conversation_ids, "arrived": arrived, "before": before_id or _NO_END, "limit": limit}
    return list(reversed(_WINDOW.all(session, params)))


def window(session: Session, conversation: Conversation, before_id: int | None, limit: int) -> list[Turn]:
    """The last ``limit`` turns this character heard in the chat before ``before_id``, oldest first."""
    return _turns(session, _window_rows(session, *_scope(session, conversation), before_id, limit))


def _heard() -> tuple[ColumnElement[bool], ...]:
    """Postings of the turns the character heard: bound ``chat_id``, ``conversations``, ``arrived``, ``before``."""
    return (
        _TERMS.chat_id == bindparam("chat_id"),
        _TERMS.conversation_id.in_(bindparam("conversations", expanding=True)),
        _TERMS.message_id >= bindparam("arrived"),
        _TERMS.message_id < bindparam("before"),
    )


def _bm25_statement() -> Select[tuple[int, float]]:
    """Top turns by BM25 over the postings of up to QUERY_TERMS terms, summed by the database."""
    terms_ = [bindparam(f"t{i}", type_=String) for i in range(QUERY_TERMS)]
    idf = case(*((_TERMS.term == t, bindparam(f"w{i}", type_=Float)) for i, t in enumerate(terms_)), else_=0.0)
    tf = _TERMS.count * 1.0
    norm = tf + _BM25_K1 * (1 - _BM25_B + _BM25_B * _TERMS.length / bindparam("average", type_=Float))
    score = func.sum(idf * tf * (_BM25_K1 + 1) / norm).label("score")
    return (
        select(_TERMS.message_id, score)
        .where(_TERMS.term.in_(terms_), *_heard())
        .group_by(_TERMS.message_id)
        .order_by(score.desc(), _TERMS.message_id.desc())
        .limit(bindparam("limit"))
    )


# Statements built once (building them is most of the cost of a small query); the caller binds the values.
_UNINDEXED = _unindexed_statement()
_WINDOW = Prepared(
    select(*_TURN_COLUMNS)
    .where(
        _MESSAGES.conversation_id.in_(bindparam("conversations", expanding=True)),
        _MESSAGES.id >= bindparam("arrived"),
        _MESSAGES.id < bindparam("before"),
        _TURN_ROLE,
    )
    .order_by(_MESSAGES.id.desc())
    .limit(bindparam("limit"))
)
_TERM_STATS = Prepared(
    select(_TERMS.term, func.count(), func.sum(_TERMS.length))
    .where(_TERMS.term.in_(bindparam("terms", expanding=True)), *_heard())
    .group_by(_TERMS.term)
)
_BM25_TOP = _bm25_statement().subquery()
_BM25 = Prepared(  # the best turns themselves, best first, in the same statement
    select(*_TURN_COLUMNS)
    .join(_BM25_TOP, _BM25_TOP.c.message_id == _MESSAGES.id)
    .order_by(_BM25_TOP.c.score.desc(), _MESSAGES.id.desc())
)
_SPEAKERS = (
    select(_CONVERSATIONS.id, _USERS.display_name, _CHARACTERS.name)
    .join(User.__table__, _USERS.id == _CONVERSATIONS.user_id)
    .join(Character.__table__, _CHARACTERS.id == _CONVERSATIONS.character_id)
    .where(_CONVERSATIONS.id.in_(bindparam("ids", expanding=True)))
)
_FACTS = (
    select(Memory)
    .where(
        _MEMORIES.user_id == bindparam("user_id"),
        _MEMORIES.character_id == bindparam("character_id"),
        (_MEMORIES.kind == PINNED) | ((_MEMORIES.kind == EXTRACTED) & (_MEMORIES.chat_id == bindparam("chat_id"))),
    )
    .order_by(_MEMORIES.id)
)
_SUMMARY = (
    select(Memory)
    .where(_MEMORIES.conversation_id == bindparam("conversation_id"), _MEMORIES.kind == SUMMARY)
    .order_by(_MEMORIES.covers_until_message_id.desc(), _MEMORIES.id.desc())
    .limit(1)
)
_FACTS_AND_SUMMARIES = Prepared(  # what a reply reads of both, in one statement, as plain rows
    select(Memory.__table__)
    .where(
        _FACTS.whereclause  # type: ignore[arg-type]
        | ((_MEMORIES.conversation_id == bindparam("conversation_id")) & (_MEMORIES.kind == SUMMARY))
    )
    .order_by(_MEMORIES.id)
)


def recall(
    session: Session, conversation: Conversation, query: str, *, before_id: int, limit: int, index: bool = True
) -> list[Turn]:
    """Up to ``limit`` turns heard before ``before_id`` that best match ``query`` (BM25), best first.

    ``index=False`` reads the index as it is (a read-only transaction; see :func:`index_due`).
    """
    wanted = set(terms(query))
    if limit <= 0 or not wanted:
        return []
    if index:
        index_chat(session, conversation.chat_id)
    conversation_ids, arrived = _scope(session, conversation)
    scope = {"chat_id": conversation.chat_id, "conversations": conversation_ids, "arrived": arrived, "before": before_id}
    stats = _TERM_STATS.all(session, {"terms": [*wanted, DOCUMENT], **scope})
    df = {term: n for term, n, _ in stats if term != DOCUMENT}
    if not df:
        return []
    total = next(n for term, n, _ in stats if term == DOCUMENT)  # the turns in scope
    average = sum(length for term, _, length in stats if term != DOCUMENT) / sum(df.values())
    chosen, budget = [], MAX_POSTINGS
    for term in sorted(df, key=df.__getitem__)[:QUERY_TERMS]:  # rarest first: they carry the meaning
        if df[term] > budget:
            break
        chosen.append(term)
        budget -= df[term]
    if not chosen:  # every term is in thousands of turns: none tells them apart
        return []
    params: dict[str, Any] = {**scope, "average": average, "limit": limit}
    for i in range(QUERY_TERMS):  # a fixed shape, so that the statement is compiled once and cached
        term = chosen[i] if i < len(chosen) else _NO_TERM
        params[f"t{i}"] = term
        params[f"w{i}"] = math.log(1 + (total - df[term] + 0.5) / (df[term] + 0.5)) if term in df else 0.0
    return _turns(session, _BM25.all(session, params))


def facts(session: Session, user_id: int, character_id: int, chat_id: int) -> list[Memory]:
    """The facts this character knows about the user here: pinned ones, then those learnt in this chat."""
    params = {"user_id": user_id, "character_id": character_id, "chat_id": chat_id}
    return sorted(session.scalars(_FACTS, params).all(), key=lambda m: m.kind != PINNED)


def latest_summary(session: Session, conversation_id: int) -> Memory | None:
    """The conversation's current rolling summary."""
    return session.scalars(_SUMMARY, {"conversation_id": conversation_id}).first()


def memory_context(
    session: Session, conversation: Conversation, new_message: Message, settings: Settings, *, index: bool = True
) -> MemoryContext:
    """What memory adds to the reply to ``new_message`` (already stored in the conversation).

    In a direct chat the window is read ``summary_every`` turns deeper: those tell whether the reply makes a
    rolling summary due, so that the reply's transaction need not ask. ``index=False`` writes nothing: the
    caller indexes the chat in the reply's transaction when :func:`index_due` says so.
    """
    conversation_ids, arrived = _scope(session, conversation)
    direct = conversation_ids == [conversation.id]
    size = settings.history_messages
    rows = _window_rows(
        session, conversation_ids, arrived, new_message.id, size + (settings.summary_every if direct else 0)
    )
    recent = _turns(session, rows[-size:])
    params = {
        "user_id": conversation.user_id, "character_id": conversation.character_id,
        "chat_id": conversation.chat_id, "conversation_id": conversation.id,
    }
    memories = _FACTS_AND_SUMMARIES.all(session, params)
    summaries = [m for m in memories if m.kind == SUMMARY]  # as latest_summary orders them
    summary = max(summaries, key=lambda m: (m.covers_until_message_id or 0, m.id), default=None)
    known = sorted((m for m in memories if m.kind != SUMMARY), key=lambda m: m.kind != PINNED)  # as facts() does
    # a window with room to spare holds every turn heard so far: nothing older is left to recall (nor to index yet)
    fits = len(recent) < size
    floor = recent[0].message_id if recent else new_message.id
    limit = 0 if fits else settings.recall_turns
    recalled = recall(session, conversation, new_message.text, before_id=floor, limit=limit, index=index)
    covered = (summary.covers_until_message_id or 0) if summary else 0
    return MemoryContext(
        window=recent,
        summary=summary.text if summary else "",
        pinned=[m.text for m in known if m.kind == PINNED],
        extracted=[m.text for m in known if m.kind == EXTRACTED],
        recalled=recalled,
        unsummarised=_left_window(rows, covered, size) if direct else None,
    )


def index_due(context: MemoryContext, settings: Settings) -> bool:
    """Whether the next reply's window will be full (so it recalls): the chat is indexed with this reply then.

    Indexing with the reply keeps the reading of memory free of writes; recall only searches turns older than
    the window, and those were indexed by an earlier reply.
    """
    return settings.recall_turns > 0 and len(context.window) + 2 >= settings.history_messages


def _left_window(rows: Sequence[Any], covered: int, size: int) -> int:
    """Turns of ``rows`` (the newest before the new message, oldest first) past ``covered`` that fall out of a
    ``size``-turn window once the new message and its reply are stored; as _unsummarised and _PENDING count them."""
    return sum(1 for row in rows[: max(0, len(rows) + 2 - size)] if row.id > covered)


# --- rolling summaries (the SUMMARY job) -------------------------------------------------------------------


_BOUNDARY = (
    select(_MESSAGES.id)
    .where(_MESSAGES.conversation_id == bindparam("conversation_id"), _TURN_ROLE)
    .order_by(_MESSAGES.id.desc())
    .offset(bindparam("window"))
    .limit(1)
)
_PENDING = (
    select(func.count())
    .select_from(Message)
    .where(
        _MESSAGES.conversation_id == bindparam("conversation_id"),
        _TURN_ROLE,
        _MESSAGES.id > bindparam("covered"),
        _MESSAGES.id <= bindparam("boundary"),
    )
)
_POSTING_COLUMNS: Final = ("message_id", "term", "chat_id", "conversation_id", "count", "length")
# another worker may index the same turns at the same time: the first one wins. SQLite runs a row per execution
# in C; PostgreSQL takes them all in one statement as columns of arrays (a round trip and a plan per row else)
_NEW_POSTINGS: Final = {
    "sqlite": Prepared(sqlite.insert(MessageTerm.__table__).on_conflict_do_nothing()),
    "postgresql": Prepared(
        postgresql.insert(MessageTerm.__table__)
        .from_select(
            _POSTING_COLUMNS,
            select(
                func.unnest(
                    *(bindparam(name, type_=postgresql.ARRAY(_TERMS[name].type)) for name in _POSTING_COLUMNS)
                )
                .table_valued(*_POSTING_COLUMNS)
                .render_derived(name="postings")
            ),
        )
        .on_conflict_do_nothing()
    ),
}


def _insert_postings(session: Session, postings: Sequence[dict[str, Any]]) -> None:
    """Add ``postings`` (dicts of ``_POSTING_COLUMNS``); those already there are kept."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        _NEW_POSTINGS[dialect].rowcount(session, {name: [p[name] for p in postings] for name in _POSTING_COLUMNS})
    else:
        _NEW_POSTINGS[dialect].many(session, postings)


_OPEN_SUMMARY = Prepared(
    select(_JOBS.id).where(
        _JOBS.conversation_id == bindparam("conversation_id"),
        _JOBS.kind == JobKind.SUMMARY,
        _JOBS.state.not_in(list(TERMINAL_STATES)),
    )
)


def _unsummarised(session: Session, conversation: Conversation, settings: Settings) -> tuple[int, int]:
    """(last turn covered by the summary, newest turn outside the recent window); equal when nothing is due."""
    params = {"conversation_id": conversation.id, "window": settings.history_messages}
    boundary = session.scalar(_BOUNDARY, params)
    if boundary is None:  # the conversation still fits the window: no summary needs looking at
        return 0, 0
    summary = latest_summary(session, conversation.id)
    covered = (summary.covers_until_message_id or 0) if summary else 0
    return covered, max(covered, boundary)


def summary_due(
    session: Session, conversation: Conversation, settings: Settings, unsummarised: int | None = None
) -> bool:
    """Whether enough turns fell out of the window to summarise, and no SUMMARY job is already open for them.

    ``unsummarised`` is ``MemoryContext.unsummarised`` of the reply just stored, when known: no need to count again.
    """
    if unsummarised is None:
        covered, boundary = _unsummarised(session, conversation, settings)
        if boundary == covered:
            return False
        params = {"conversation_id": conversation.id, "covered": covered, "boundary": boundary}
        unsummarised = session.scalar(_PENDING, params) or 0
    if unsummarised < settings.summary_every:
        return False
    return _OPEN_SUMMARY.scalar(session, {"conversation_id": conversation.id}) is None


def summary_request(
    session: Session, conversation: Conversation, settings: Settings, count_tokens: Callable[[str], int]
) -> SummaryRequest | None:
    """The model request that folds the turns that left the window into the rolling summary; None if none did."""
    covered, boundary = _unsummarised(session, conversation, settings)
    if boundary == covered:
        return None
    rows = session.execute(
        select(*_TURN_COLUMNS)
        .where(
            Message.conversation_id == conversation.id,
            Message.role.in_(TURN_ROLES),
            Message.id > covered,
            Message.id <= boundary,
        )
        .order_by(Message.id)
    ).all()
    turns = _turns(session, rows)
    user_name, character_name = _speakers(session, [conversation.id])[conversation.id]
    summary = latest_summary(session, conversation.id)
    head = (
        f"You keep the memory of {character_name}, who is role-playing with {user_name}.\n\n"
        f"What {character_name} remembered so far:\n{summary.text if summary else '(nothing yet)'}\n\n"
        "What happened next:\n"
    )
    tail = (
        f"\n\nWrite an updated summary of the whole story so far in at most {SUMMARY_WORDS} words, in the third "
        "person, keeping names, places, promises and feelings. Then write a line 'Facts:' followed by lasting facts "
        f"about {user_name} that were just learnt, one per line starting with '- ', or 'Facts: none'."
    )
    budget = settings.context_tokens - SUMMARY_REPLY_TOKENS - count_tokens(head + tail)
    lines, last = [], covered
    for turn in turns:  # oldest first, so that coverage stays contiguous; the rest waits for the next job
        line = f"{turn.speaker}: {turn.text}"
        budget -= count_tokens(line)
        if budget < 0 and lines:
            break
        lines.append(line)
        last = turn.message_id
    return SummaryRequest(conversation.id, [TextSegment(head + "\n".join(lines) + tail)], last)


def _parse_summary(text: str) -> tuple[str, list[str]]:
    """The summary and the fact lines of a model's answer."""
    match = _FACTS_LINE.search(text)
    if match is None:
        return text.strip(), []
    found = []
    for line in text[match.end() :].splitlines():
        line = line.strip().lstrip("-*• ").strip()
        if line and line.casefold().rstrip(".") != "none":
            found.append(line[:MAX_FACT_CHARS])
    return text[: match.start()].strip(), found


def _add_fact(session: Session, user_id: int, character_id: int, chat_id: int | None, kind: str, text: str) -> bool:
    """Store a fact unless the same one is known; the oldest of the kind goes past MAX_FACTS."""
    rows = session.scalars(
        select(Memory)
        .where(Memory.user_id == user_id, Memory.character_id == character_id, Memory.kind == kind)
        .order_by(Memory.id)
    ).all()
    if any(row.text.casefold() == text.casefold() for row in rows):
        return False
    for row in rows[: max(0, len(rows) - MAX_FACTS + 1)]:
        session.delete(row)
    session.add(Memory(user_id=user_id, character_id=character_id, chat_id=chat_id, kind=kind, text=text))
    return True


def store_summary(session: Session, conversation_id: int, text: str, covers_until_message_id: int) -> bool:
    """Keep the model's summary and extracted facts; False when it is empty or an earlier duplicate (a re-run)."""
    conversation = session.get(Conversation, conversation_id)
    if conversation is None:
        return False  # forgotten meanwhile
    current = latest_summary(session, conversation_id)
    if current is not None and (current.covers_until_message_id or 0) >= covers_until_message_id:
        return False
    summary, found = _parse_summary(text)
    if not summary:
        log.warning("empty summary for conversation %s; it stays due", conversation_id)
        return False
    session.execute(delete(Memory).where(Memory.conversation_id == conversation_id, Memory.kind == SUMMARY))
    session.add(
        Memory(
            user_id=conversation.user_id,
            character_id=conversation.character_id,
            conversation_id=conversation_id,
            chat_id=conversation.chat_id,
            kind=SUMMARY,
            text=summary,
            covers_until_message_id=covers_until_message_id,
        )
    )
    for fact in found:
        _add_fact(session, conversation.user_id, conversation.character_id, conversation.chat_id, EXTRACTED, fact)
    session.flush()
    return True


# --- chat commands --------------------------------------------------------------------------------------------


def remember(session: Session, conversation: Conversation, text: str) -> str:
    """/remember TEXT: pin a fact the character keeps about the user in every chat."""
    text = " ".join(text.split())
    if not text:
        return "Tell me what to remember: /remember TEXT, for example /remember I am allergic to cats."
    if len(text) > MAX_FACT_CHARS:
        return f"That is {len(text)} characters; a fact to remember can be at most {MAX_FACT_CHARS}."
    if not _add_fact(session, conversation.user_id, conversation.character_id, conversation.chat_id, PINNED, text):
        return "I already remember that."
    return f"I will remember: {text}"


def _numbered(session: Session, conversation: Conversation) -> list[Memory]:
    return facts(session, conversation.user_id, conversation.character_id, conversation.chat_id)


def forget(session: Session, conversation: Conversation, arg: str, store: FileStore | None = None) -> str:
    """/forget N, /forget all, or /forget me (everything of the user, after /forget me confirm)."""
    arg = arg.strip().casefold()
    if arg == "me":
        return (
            "This deletes everything I have of you: your conversations with every character, memories, persona, "
            "pictures and submissions. It cannot be undone. Send /forget me confirm to go ahead."
        )
    if arg == "me confirm":
        forget_user(session, conversation.user_id, store)
        return "Done: everything I had of you is deleted."
    known = _numbered(session, conversation)
    if arg == "all":
        for row in known:
            session.delete(row)
        return f"Forgotten: {counted(len(known), 'fact')}." if known else "There was nothing to forget."
    if arg.isdigit() and 1 <= int(arg) <= len(known):
        row = known[int(arg) - 1]
        session.delete(row)
        return f"Forgotten: {row.text}"
    return "Use /forget N (a number from /memory), /forget all (every fact), or /forget me (everything of you)."


def persona(session: Session, user: User, arg: str) -> str:
    """/persona TEXT sets who you are for every character; /persona shows it; /persona clear removes it."""
    text = " ".join(arg.split())
    if not text:
        return f"Your persona: {user.persona}" if user.persona else "You have no persona yet: /persona TEXT sets one."
    if text.casefold() == "clear":
        user.persona = ""
        return "Your persona is cleared."
    if len(text) > MAX_PERSONA_CHARS:
        return f"That is {len(text)} characters; a persona can be at most {MAX_PERSONA_CHARS}."
    user.persona = text
    return f"Your persona is now: {text}"


def describe_memory(session: Session, conversation: Conversation) -> str:
    """/memory: what the character remembers of the user here, numbered for /forget."""
    user = session.get(User, conversation.user_id)
    character = session.get(Character, conversation.character_id)
    lines = [f"What {character.name if character else 'the character'} remembers of you:"]
    lines.append(f"Persona: {user.persona}" if user is not None and user.persona else "Persona: none (/persona TEXT)")
    known = _numbered(session, conversation)
    for i, row in enumerate(known, 1):
        lines.append(f"{i}. {row.text}" + (" (learnt)" if row.kind == EXTRACTED else ""))
    if not known:
        lines.append("No facts yet (/remember TEXT pins one).")
    summary = latest_summary(session, conversation.id)
    if summary is not None:
        lines.append(f"The story so far: {summary.text}")
    turns = session.scalar(select(func.count()).select_from(Message).where(Message.conversation_id == conversation.id))
    lines.append(f"{counted(turns or 0, 'message')} in this conversation; /forget N, /forget all, /reset, /forget me.")
    return "\n".join(lines)


# --- export and forget-me ---------------------------------------------------------------------------------


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None


def export_user(session: Session, user_id: int) -> dict[str, Any]:
    """Everything memory holds of a user, as JSON-ready data: persona, conversations with their turns, memories."""
    user = session.get(User, user_id)
    if user is None:
        raise LookupError(f"no user {user_id}")
    names = dict(session.execute(select(Character.id, Character.name)).all())
    conversations = []
    for conv in session.scalars(select(Conversation).where(Conversation.user_id == user_id).order_by(Conversation.id)):
        chat = session.get(Chat, conv.chat_id)
        messages = session.scalars(select(Message).where(Message.conversation_id == conv.id).order_by(Message.id))
        conversations.append(
            {
                "character": names.get(conv.character_id),
                "chat": chat.platform_chat_id if chat else None,
                "active": conv.active,
                "started": _iso(conv.created_at),
                "messages": [
                    {"role": m.role, "text": m.text, "images": list(m.image_keys), "at": _iso(m.created_at)}
                    for m in messages
                ],
            }
        )
    memories = session.scalars(select(Memory).where(Memory.user_id == user_id).order_by(Memory.id))
    return {
        "user": {
            "platform": user.platform,
            "id": user.platform_user_id,
            "display_name": user.display_name,
            "persona": user.persona,
            "since": _iso(user.created_at),
        },
        "conversations": conversations,
        "memories": [
            {"kind": m.kind, "character": names.get(m.character_id), "text": m.text, "at": _iso(m.created_at)}
            for m in memories
        ],
    }


def _purge(session: Session, table: Table, where: ColumnElement[bool]) -> int:
    """Delete ``table``'s rows matching ``where``: first the rows that depend on them, or unlink the SET NULL ones."""
    for child in Base.metadata.sorted_tables:
        for fk in child.foreign_keys:
            if fk.column.table is not table or child is table:
                continue
            keys = select(fk.column).where(where)
            if (fk.ondelete or "").upper() == "SET NULL":
                session.execute(update(child).where(fk.parent.in_(keys)).values({fk.parent.name: None}))
            else:
                _purge(session, child, fk.parent.in_(keys))
    return session.execute(delete(table).where(where)).rowcount or 0


def _user_files(session: Session, user_id: int) -> set[str]:
    """File-store keys of the user's pictures and submission images."""
    keys: set[str] = set()
    for image_keys in session.scalars(
        select(Message.image_keys).join(Conversation).where(Conversation.user_id == user_id)
    ):
        keys.update(image_keys or [])
    keys.update(
        session.scalars(
            select(SubmissionImage.file_key).join(CharacterSubmission).where(CharacterSubmission.user_id == user_id)
        )
    )
    return keys


def _still_used(session: Session, key: str) -> bool:
    """Whether a file is referenced by a row that stays (another user's message, a character's image)."""
    return any(
        session.scalar(select(func.count()).where(condition))
        for condition in (
            ReferenceImage.file_key == key,
            SubmissionImage.file_key == key,
            Character.avatar_key == key,
            cast(Message.image_keys, String).contains(key),
        )
    )


def forget_user(session: Session, user_id: int, store: FileStore | None = None) -> dict[str, int]:
    """Delete every row of a user in every table, and their files once the transaction commits; rows per table.

    The session's objects are detached afterwards (some were deleted under them): reload what you still need.
    """
    session.flush()
    files = _user_files(session, user_id)
    other = aliased(Conversation)
    shared = exists().where(other.chat_id == Conversation.chat_id, other.user_id != user_id)
    private_chats = (
        select(Conversation.chat_id)
        .join(Chat, Chat.id == Conversation.chat_id)
        .where(Conversation.user_id == user_id, Chat.is_group.is_(False), ~shared)
    )
    chat_ids = set(session.scalars(private_chats))
    counts = {"chats": _purge(session, Chat.__table__, Chat.id.in_(chat_ids))} if chat_ids else {}
    counts["users"] = _purge(session, User.__table__, User.id == user_id)
    session.expunge_all()
    session.info.pop(_KNOWN_SPEAKERS, None)
    session.info.pop(_KNOWN_GROUPS, None)
    orphans = [key for key in files if not _still_used(session, key)]
    if store is not None and orphans:
        event.listen(session, "after_commit", lambda _s: [store.delete(k) for k in orphans], once=True)
    log.info("forgot user %s: %s, %d files", user_id, counts, len(orphans))
    return counts
