"""The conversation service every frontend shares: an incoming message becomes a stored turn and a queued job.

``ChatService.handle`` validates first (length, attachments through ``core.media``), then in ONE transaction
resolves the user, chat, character and conversation and writes the user's message with its ``Job`` row; only after
the commit does it dispatch the job id to the broker. A refusal writes nothing. If dispatching fails the job stays
queued and the sweeper re-sends it, so the outcome is still a queued job. Commands (/characters, /use, /imagine,
/reset, /status, /help and the memory commands of ``core.memory``) are answered here so that Discord, Telegram and
the console behave alike.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, Literal, TypeAlias

from sqlalchemy import bindparam, func, select, update

from core import memory
from core.db import repositories as repo
from core.db.models import Character, Chat, Conversation, Job, User, utcnow
from core.imaging import check_request, lexical_ask, new_seed, sampler_params
from core.jobs import QUEUED_BEHIND, JobKind, JobState
from core.media import FileStore, MediaError, validate_image
from core.queue import position
from core.wording import counted

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from core.config import Settings
    from core.jobs import IncomingMessage

__all__ = ["Dispatch", "JobQueued", "Answer", "Refusal", "ChatOutcome", "COMMANDS", "ChatService"]

logger = logging.getLogger(__name__)

Dispatch: TypeAlias = Callable[[int, JobKind], None]  # sends the task for (job id, kind) to the kind's queue


@dataclass(frozen=True, slots=True)
class JobQueued:
    """The message was stored and a job queued; follow ``core.streams`` for ``job_id``."""

    job_id: int
    kind: JobKind
    position: int | None
    character: str
    type: Literal["job"] = "job"


@dataclass(frozen=True, slots=True)
class Answer:
    """A command's answer; ``choices`` are names a frontend may offer as buttons."""

    text: str
    choices: tuple[str, ...] = ()
    type: Literal["answer"] = "answer"


@dataclass(frozen=True, slots=True)
class Refusal:
    """The input was refused and nothing was stored; ``reason`` is fit to show the user."""

    reason: str
    type: Literal["refusal"] = "refusal"


ChatOutcome: TypeAlias = JobQueued | Answer | Refusal

COMMANDS: Final[dict[str, str]] = {
    "characters": "list the characters you can talk to",
    "use": "NAME: talk to another character",
    "imagine": "PROMPT: ask the character for a picture",
    "regenerate": "[N]: draw your last picture here again (or picture N), with a new seed",
    "reset": "start the conversation over",
    "remember": "TEXT: pin a fact the character keeps about you",
    "memory": "what the character remembers of you",
    "forget": "N | all | me: forget a fact, every fact, or everything of you",
    "persona": "TEXT | clear: tell every character who you are",
    "status": "your requests and their place in the queue",
    "help": "this list",
}


_LATEST_PICTURE: Final = (
    select(func.max(Job.id))
    .join(Conversation, Conversation.id == Job.conversation_id)
    .where(Job.kind == JobKind.IMAGE, Job.user_id == bindparam("user_id"), Conversation.chat_id == bindparam("chat_id"))
)
_COMMAND: Final = re.compile(r"/([A-Za-z0-9_]+)(?:@\w+)?(?:\s+(.*))?\Z", re.S)  # "/help@MyBot" in Telegram groups


def help_text() -> str:
    """The command list, one line each."""
    return "Commands:\n" + "\n".join(f"/{name} {text}" for name, text in COMMANDS.items())


class _Refused(Exception):
    """Raised inside a transaction to roll it back and answer with a refusal."""


@dataclass(slots=True)
class _Who:
    """The rows one message resolves to, inside one transaction."""

    user: User
    chat: Chat
    character: Character | None


_NO_CHARACTER: Final = "No character is available yet: an admin has to add one first."


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


class ChatService:
    """Platform-neutral entry point: ``handle(message) -> ChatOutcome``; thread-safe (a session per call)."""

    def __init__(
        self,
        sessionmaker: sessionmaker[Session],
        settings: Settings,
        dispatch: Dispatch,
        store: FileStore | None = None,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.settings = settings
        self.dispatch = dispatch
        self.store = store or FileStore(settings.files_dir)
        self._commands: dict[str, Callable[[IncomingMessage, str], ChatOutcome]] = {
            "characters": self._characters,
            "use": self._use,
            "imagine": self._imagine,
            "regenerate": self._regenerate,  # the Regenerate button under a picture: /regenerate JOB_ID
            "reset": self._reset,
            "status": self._status,
            "remember": self._memory_command(lambda session, _user, conv, arg: memory.remember(session, conv, arg)),
            "memory": self._memory_command(lambda session, _user, conv, _arg: memory.describe_memory(session, conv)),
            "forget": self._memory_command(
                lambda session, _user, conv, arg: memory.forget(session, conv, arg, self.store)
            ),
            "persona": self._memory_command(lambda session, user, _conv, arg: memory.persona(session, user, arg)),
            "help": lambda _message, _arg: Answer(help_text()),
            "start": lambda _message, _arg: Answer(help_text()),  # Telegram's first-contact command
        }

    def handle(self, message: IncomingMessage) -> ChatOutcome:
        """Answer a command, or store a chat message and queue its reply; refusals store nothing."""
        if len(message.text) > self.settings.max_message_chars:
            return Refusal(
                f"Your message is {len(message.text):,} characters long; the limit is "
                f"{self.settings.max_message_chars:,}. Please shorten it."
            )
        text = message.text.strip()
        try:
            if not text.startswith("/"):
                return self._chat(message, text)
            match = _COMMAND.match(text)
            command = self._commands.get(match.group(1).lower()) if match else None
            if match is None or command is None:
                return Refusal(f"Unknown command {text.split()[0]}.\n{help_text()}")
            return command(message, (match.group(2) or "").strip())
        except _Refused as refusal:
            return Refusal(str(refusal))

    def cancel(self, platform: str, platform_user_id: str, job_id: int) -> ChatOutcome:
        """Cancel one of the user's queued or running jobs; a running job stops at its next step."""
        with self.sessionmaker.begin() as session:
            job = session.get(Job, job_id)
            user = session.get(User, job.user_id) if job is not None and job.user_id is not None else None
            if job is None or user is None or (user.platform, user.platform_user_id) != (platform, platform_user_id):
                return Refusal("There is no such request of yours.")
            done = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.state.in_([JobState.QUEUED, JobState.RUNNING]))
                .values(state=JobState.CANCELLED, finished_at=utcnow())
            ).rowcount
        return Answer("Cancelled." if done else "That request has already finished.")

    # --- the message path -----------------------------------------------------------------------------------

    def _who(self, session: Session, message: IncomingMessage) -> _Who:
        user = repo.get_or_create_user(session, message.platform, message.user_id, message.display_name)
        chat = repo.get_or_create_chat(session, message.platform, message.chat_id, message.is_group)
        character = self._addressed(session, message) or repo.resolve_character(
            session, user, chat, self.settings.default_character
        )
        return _Who(user, chat, character)

    @staticmethod
    def _addressed(session: Session, message: IncomingMessage) -> Character | None:
        """The published character a frontend addressed the message to (``IncomingMessage.character_id``), if any."""
        character = session.get(Character, message.character_id) if message.character_id is not None else None
        return character if character is not None and character.status == "published" else None

    def _conversation(self, session: Session, who: _Who) -> Conversation:
        if who.character is None:
            raise _Refused(_NO_CHARACTER)
        return repo.active_conversation(session, who.user.id, who.character.id, who.chat.id)

    def _queue(
        self, message: IncomingMessage, kind: JobKind, text: str, images: list[str], params: dict[str, object]
    ) -> ChatOutcome:
        """Store the user's turn and its job in one transaction, then dispatch after commit."""
        with self.sessionmaker.begin() as session:
            turn = self._turn(session, message, kind)
            if turn.character_id is None:
                raise _Refused(_NO_CHARACTER)
            if turn.open_jobs >= self.settings.max_open_jobs:
                raise _Refused(
                    f"You already have {counted(self.settings.max_open_jobs, 'request')} in progress; "
                    "please wait for one to finish (/status shows them)."
                )
            if kind is JobKind.IMAGE:
                chat, character = session.get_one(Chat, turn.chat_id), session.get_one(Character, turn.character_id)
                params = self._picture_params(session, turn.user_id, chat, character, params)
            elif turn.queued:  # its frontend shows a queue line until the worker says it started (workers.inference)
                params = {**params, QUEUED_BEHIND: turn.queued}
            conversation_id = turn.conversation_id or repo.start_conversation(
                session, turn.user_id, turn.character_id, turn.chat_id
            )
            message_id = repo.insert_message(session, conversation_id, "user", text, images, message.message_id)
            job_id = repo.insert_job(session, kind, turn.user_id, conversation_id, message_id, params)
            # the queue's jobs were counted in this transaction, before this one joined at its end
            outcome = JobQueued(job_id, kind, turn.queued + 1, turn.character_name or "")
        return self._dispatched(outcome)

    def _turn(self, session: Session, message: IncomingMessage, kind: JobKind) -> repo.Turn:
        """The message's user, chat, character, conversation and job counts; a first contact creates the rows."""
        args = (session, message.platform, message.user_id, message.chat_id, kind, self.settings.default_character)
        turn = repo.resolve_turn(*args)
        if turn is None:  # a new user or chat
            self._who(session, message)
            turn = repo.resolve_turn(*args)  # the new rows are flushed first
            if turn is None:  # the rows were created just now
                raise LookupError(f"user {message.user_id} or chat {message.chat_id} vanished while being created")
        elif message.display_name and turn.display_name != message.display_name:
            repo.rename_user(session, turn.user_id, message.display_name)
        addressed = self._addressed(session, message)
        if addressed is not None and addressed.id != turn.character_id:
            conversation = repo.active_conversation(session, turn.user_id, addressed.id, turn.chat_id)
            turn = turn._replace(
                character_id=addressed.id, character_name=addressed.name, conversation_id=conversation.id
            )
        return turn

    def _dispatched(self, outcome: JobQueued) -> JobQueued:
        """Send the committed job to its queue; when that fails the job row is the truth: the sweeper re-sends it."""
        try:
            self.dispatch(outcome.job_id, outcome.kind)
        except Exception:
            logger.warning("dispatching job %s failed; the sweeper will re-send it", outcome.job_id, exc_info=True)
        return outcome

    def _picture_params(
        self, session: Session, user_id: int, chat: Chat, character: Character, params: dict[str, object]
    ) -> dict[str, object]:
        """A picture's params with its chat, a new seed and the sampler settings; refused by ``check_request``."""
        reason = check_request(
            session, self.settings, prompt=str(params.get("prompt", "")), user_id=user_id, chat=chat,
            character=character,
        )
        if reason is not None:
            raise _Refused(reason)
        return {**params, "chat_id": chat.id, **sampler_params(self.settings, new_seed())}

    def _chat(self, message: IncomingMessage, text: str) -> ChatOutcome:
        if not text and not message.attachments:
            return Refusal("Your message is empty: write something (or send a picture) and I will answer.")
        if len(message.attachments) > self.settings.max_images_per_message:
            return Refusal(f"Send at most {counted(self.settings.max_images_per_message, 'picture')} in one message.")
        clean = []
        for attachment in message.attachments:
            try:
                clean.append(validate_image(attachment.data, self.settings))
            except MediaError as error:
                return Refusal(f"I can't use {attachment.filename or 'your file'}: {error}")
        # content-addressed blobs: writing them before the transaction can leave at most an unreferenced blob
        keys = [self.store.put(image.data, image.suffix) for image in clean]
        return self._queue(message, JobKind.CHAT, text, keys, {})

    # --- commands ---------------------------------------------------------------------------------------------

    def _imagine(self, message: IncomingMessage, prompt: str) -> ChatOutcome:
        if not prompt:
            return Refusal("Tell me what to draw: /imagine PROMPT, for example /imagine us at the harbour at dusk.")
        if message.attachments:
            return Refusal("/imagine takes words only; send a picture without a command to talk about it.")
        subject = lexical_ask(prompt)[1]  # "a lighthouse" is a thing, "us at the harbour" a scene, "you" the character
        return self._queue(message, JobKind.IMAGE, message.text.strip(), [], {"prompt": prompt, "subject": subject})

    def _regenerate(self, message: IncomingMessage, arg: str) -> ChatOutcome:
        """A new variation of a picture: the same scene and settings, a new seed; only its requester may ask."""
        with self.sessionmaker.begin() as session:
            who = self._who(session, message)
            if not arg:  # no number: the user's latest picture in this chat
                arg = str(session.scalar(_LATEST_PICTURE, {"user_id": who.user.id, "chat_id": who.chat.id}) or "")
                if not arg:
                    raise _Refused("You have no picture here to draw again; ask for one with /imagine PROMPT.")
            job = session.get(Job, int(arg)) if arg.isdigit() else None
            if job is None or job.kind is not JobKind.IMAGE or job.user_id != who.user.id:
                raise _Refused("Only the person who asked for this picture can redraw it.")
            conversation = session.get(Conversation, job.conversation_id) if job.conversation_id else None
            character = session.get(Character, conversation.character_id) if conversation else None
            if conversation is None or character is None:
                raise _Refused("This picture's conversation is gone, so I can't redraw it.")
            if repo.count_open_jobs(session, who.user.id) >= self.settings.max_open_jobs:
                open_jobs = counted(self.settings.max_open_jobs, "request")
                raise _Refused(f"You already have {open_jobs} in progress; please wait.")
            old = dict(job.params)
            chat = session.get(Chat, conversation.chat_id) or who.chat
            fresh = self._picture_params(session, who.user.id, chat, character, old)
            params = {**fresh, **{k: v for k, v in old.items() if k != "seed"}}
            new = repo.create_job(
                session, JobKind.IMAGE, who.user.id, conversation.id, job.request_message_id, params
            )
            outcome = JobQueued(new.id, JobKind.IMAGE, position(session, new.id), character.name)
        return self._dispatched(outcome)

    def _characters(self, message: IncomingMessage, _arg: str) -> ChatOutcome:
        with self.sessionmaker.begin() as session:
            who = self._who(session, message)
            names = [c.name for c in repo.published_characters(session)]
            current = who.character.name if who.character else None
        if not names:
            return Answer("No characters are available yet.")
        lines = [f"{'* ' if name == current else '- '}{name}" for name in names]
        return Answer("Characters (switch with /use NAME):\n" + "\n".join(lines), choices=tuple(names))

    def _use(self, message: IncomingMessage, name: str) -> ChatOutcome:
        with self.sessionmaker.begin() as session:
            names = [c.name for c in repo.published_characters(session)]
            character = repo.character_by_name(session, name) if name else None
            if character is None:
                listing = ", ".join(names) or "none yet"
                if not name:
                    raise _Refused(f"Whom do you want to talk to? /use NAME, with one of: {listing}.")
                raise _Refused(f"There is no character called {name!r}. Available: {listing}.")
            who = self._who(session, message)
            if who.chat.is_group:  # in a group the chat's character is everybody's
                who.chat.active_character_id = character.id
            else:
                who.user.active_character_id = character.id
            who.character = character
            greeting = self._greet_if_new(session, who)
            reply = f"You are now talking with {character.name}."
        return Answer(f"{reply}\n\n{greeting}" if greeting else reply)

    def _reset(self, message: IncomingMessage, _arg: str) -> ChatOutcome:
        with self.sessionmaker.begin() as session:
            who = self._who(session, message)
            if who.character is None:
                raise _Refused(_NO_CHARACTER)
            repo.close_conversation(session, who.user.id, who.character.id, who.chat.id)
            greeting = self._greet_if_new(session, who)
            reply = f"Your conversation with {who.character.name} starts over."
        return Answer(f"{reply}\n\n{greeting}" if greeting else reply)

    def _greet_if_new(self, session: Session, who: _Who) -> str:
        """Open the conversation; a new one starts with the character's greeting, stored as its first turn."""
        conversation = self._conversation(session, who)
        greeting = who.character.greeting.strip() if who.character else ""
        if greeting and not repo.recent_messages(session, conversation.id, 1):
            repo.add_message(session, conversation, "character", greeting)
            return greeting
        return ""

    def _memory_command(
        self, run: Callable[[Session, User, Conversation, str], str]
    ) -> Callable[[IncomingMessage, str], ChatOutcome]:
        """A ``core.memory`` command on the user and their current conversation, in one transaction."""

        def command(message: IncomingMessage, arg: str) -> ChatOutcome:
            with self.sessionmaker.begin() as session:
                who = self._who(session, message)
                return Answer(run(session, who.user, self._conversation(session, who), arg))

        return command

    def _status(self, message: IncomingMessage, _arg: str) -> ChatOutcome:
        with self.sessionmaker.begin() as session:
            who = self._who(session, message)
            lines = []
            for job in repo.open_jobs(session, who.user.id):
                place = position(session, job.id)
                where = "running" if place is None else f"{_ordinal(place)} in the queue"
                lines.append(f"#{job.id} {job.kind.value}: {where}")
        return Answer("Your requests:\n" + "\n".join(lines) if lines else "You have no requests in progress.")
