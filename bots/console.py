"""The terminal frontend: ``unichar chat`` talks to the characters through exactly the bots' path.

A line becomes an ``IncomingMessage`` for ``core.chat.ChatService`` (SQL row + Job + Celery task); the reply is
read back from the job's Redis stream (``core.streams``) and shown as it arrives: text as it streams, the queue
position while the job waits, an image's progress with percent and ETA, and the image itself saved to
``settings.resolved_console_image_dir`` with its path printed. Input and output are injected streams, so a test
drives it.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO

from bots.render import format_eta
from core.chat import Answer, ChatService, JobQueued, Refusal
from core.db.installation import installation_token
from core.jobs import (
    Done,
    Failed,
    ImageFollows,
    ImageReady,
    ImageRefused,
    IncomingMessage,
    JobEvent,
    Progress,
    TextDelta,
)
from core.media import FileStore
from core.queue import position
from core.streams import follow_sync

if TYPE_CHECKING:
    from redis import Redis

    from core.chat import ChatOutcome
    from core.config import Settings

__all__ = ["PLATFORM", "ConsoleFrontend", "run_console"]

PLATFORM: Final = "console"
QUIT: Final = frozenset({"/quit", "/exit"})
HELP: Final = frozenset({"/help", "/start"})  # the chat service answers both with its command list
CONSOLE_HELP: Final = "/quit (or /exit) leave the chat\n"  # the console's own command, after the shared ones


@dataclass
class ConsoleFrontend:
    """Reads lines, hands them to the chat service and renders each job's events to ``out``."""

    service: ChatService
    redis: Redis
    installation: str  # the database's token (core.db.installation), naming its job streams
    store: FileStore
    image_dir: Path
    out: TextIO
    user: str = "local"
    idle_timeout_s: float | None = None  # give up following a job after this long without an event
    quiet_s: float = 3.0  # a job silent this long: say where it waits (a worker still starting, a busy GPU)
    _sent: int = 0
    _shown: tuple[str, int] | None = None  # the last progress shown, to skip repeats
    _stage_start: tuple[str, float, int] | None = None  # (stage, monotonic time, step) of its first event
    _line_start: bool = True  # whether the cursor is at the start of a line

    def run(self, lines: TextIO) -> int:
        """The read-answer loop until end of input or /quit; returns the exit code."""
        self._write(f"Talking as {PLATFORM}:{self.user}. /help lists the commands, /quit leaves.\n")
        while True:
            self._write("> ")
            line = lines.readline()
            if not line or line.strip() in QUIT:
                self._write("\n" if not line else "")
                return 0
            if line.strip():
                self.send(line.rstrip("\n"))

    def send(self, text: str) -> ChatOutcome:
        """One user line through the chat service; a queued job is followed to its end."""
        self._sent += 1
        message = IncomingMessage(
            platform=PLATFORM,
            user_id=self.user,
            chat_id=self.user,
            message_id=str(self._sent),
            text=text,
            display_name=self.user,
        )
        outcome = self.service.handle(message)
        if isinstance(outcome, Answer):
            self._write(outcome.text + "\n" + (CONSOLE_HELP if text.strip().lower() in HELP else ""))
        elif isinstance(outcome, Refusal):
            self._write(f"! {outcome.reason}\n")
        elif isinstance(outcome, JobQueued):
            self.follow(outcome)
        return outcome

    def follow(self, queued: JobQueued) -> None:
        """Render the job's events until it is done or failed, then the reply's scene picture when one follows."""
        self._write(f"{queued.character}: ")
        self._shown = self._stage_start = None
        if queued.position and queued.position > 1:  # next in line is the usual case: nothing to say yet
            self._progress(Progress(stage="queued", position=queued.position))
        job_ids = [queued.job_id]
        for job_id in job_ids:
            for event in self._events(job_id):
                if isinstance(event, ImageFollows):
                    job_ids.append(event.job_id)
                self.render(job_id, event)

    def _events(self, job_id: int) -> Iterator[JobEvent]:
        """The job's events until it ends. While its stream is quiet, its place in the queue (from the job rows,
        as the bots show it) every ``quiet_s``; after ``idle_timeout_s`` of quiet, a note, and no more."""
        last_id, quiet = "0", 0.0
        wait = self.quiet_s if self.idle_timeout_s is None else min(self.quiet_s, self.idle_timeout_s)
        while True:
            try:
                for entry_id, event in follow_sync(self.redis, self.installation, job_id, last_id, wait):
                    last_id, quiet = entry_id, 0.0  # after a quiet spell, read on from here
                    yield event
                return
            except TimeoutError:
                quiet += wait
            if self.idle_timeout_s is not None and quiet >= self.idle_timeout_s:
                self._status(f"! No word from the workers about request #{job_id}; /status shows where it is.")
                return
            with self.service.sessionmaker() as session:
                place = position(session, job_id)
            if place is not None:
                self._progress(Progress(stage="queued", position=place))

    def render(self, job_id: int, event: JobEvent) -> None:
        """One event on the terminal."""
        if isinstance(event, TextDelta):
            self._write(event.text)
        elif isinstance(event, Progress):
            self._progress(event)
        elif isinstance(event, ImageReady):
            self._show_image(job_id, event)
        elif isinstance(event, ImageRefused):
            self._status(f"[no picture: {event.reason}]")
        elif isinstance(event, Done):
            self._write("" if self._line_start else "\n")
        elif isinstance(event, Failed):
            self._status(f"! {event.error}")

    def _progress(self, event: Progress) -> None:
        """Queue position when it changes; a stage's percent and ETA at most every 10 % (and at 100 %)."""
        if event.stage == "retry":  # the text so far is void: the reply starts over
            self._status("[a worker stopped mid-reply; it starts over]")
            self._shown = self._stage_start = None
            return
        if event.stage == "queued" and event.position is not None:
            shown: tuple[str, int] = ("queued", event.position)
            ahead = event.position - 1
            text = f"[{ahead} ahead of you in the queue]" if ahead > 0 else "[next in the queue]"
        elif event.total:
            percent = 100 * event.step // event.total
            shown = (event.stage, percent // 10)
            text = f"[{event.stage} {percent}%{self._eta(event)}]"
        else:
            return
        if shown != self._shown:
            self._shown = shown
            self._status(text)

    def _eta(self, event: Progress) -> str:
        """The worker's ETA, or one from this stage's pace so far."""
        now = time.monotonic()
        if self._stage_start is None or self._stage_start[0] != event.stage:
            self._stage_start = (event.stage, now, event.step)
        eta = event.eta_s
        _, started, first_step = self._stage_start
        if eta is None and event.step > first_step:
            eta = (now - started) / (event.step - first_step) * (event.total - event.step)
        return f", about {format_eta(eta)} left" if eta is not None and event.step < event.total else ""

    def _show_image(self, job_id: int, event: ImageReady) -> None:
        """Copy the image out of the file store into the console's image folder and say where it is."""
        self.image_dir.mkdir(parents=True, exist_ok=True)
        target = self.image_dir / f"job{job_id}-{event.key[:12]}{Path(event.key).suffix}"
        try:
            with self.store.open(event.key) as source, target.open("wb") as sink:
                shutil.copyfileobj(source, sink)
        except FileNotFoundError:  # deleted from the file store since (a forgotten user, a cleared data folder)
            target.unlink(missing_ok=True)
            self._status(f"! The picture of request #{job_id} is no longer stored.")
            return
        self._status(f"[image saved: {target.resolve()}]")

    def _status(self, text: str) -> None:
        """A status line of its own between pieces of the reply."""
        self._write(("" if self._line_start else "\n") + text + "\n")

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()
            self._line_start = text.endswith("\n")


def run_console(settings: Settings, user: str = "local", lines: TextIO | None = None, out: TextIO | None = None) -> int:
    """``unichar chat``: connect to the stores and the broker, then run the loop on stdin/stdout."""
    import redis

    from core.db.session import make_engine, make_sessionmaker
    from workers.tasks import dispatcher

    engine = make_engine(settings.sql_url)
    sessions = make_sessionmaker(engine)
    installation = installation_token(sessions)
    client = redis.Redis.from_url(settings.redis_url)
    store = FileStore(settings.files_dir)
    frontend = ConsoleFrontend(
        service=ChatService(sessions, settings, dispatcher(installation), store),
        redis=client,
        installation=installation,
        store=store,
        image_dir=settings.resolved_console_image_dir,
        out=out or sys.stdout,
        user=user,
    )
    try:
        return frontend.run(lines or sys.stdin)
    finally:
        client.close()
        engine.dispose()
