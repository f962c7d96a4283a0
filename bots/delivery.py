"""Delivery of a job's result to a chat: follow the job's event stream, drive a platform renderer, record it in SQL.

A platform implements only :class:`Renderer` (send, edit, delete, send an image, show a chat action); this module
does the rest the same way for every frontend: streaming text into one message edited at the platform's pace,
opening a new message before the length limit, queue position and percent while an image renders, the image, the
error. Every platform message id is written to ``Job.delivery`` as soon as the message exists, and
``Job.delivered_at`` once the last one is final, so a restarted bot resumes unfinished deliveries by editing the
messages it already posted, and never posts a delivered reply twice. When the event stream is quiet the job row
is read instead: it gives the queue position, and the stored reply if the stream has expired.

A reply's scene picture is a job of its own (``ImageFollows`` on the reply's stream): the reply's delivery follows
it into the same place, with a progress line while it renders, the picture (its buttons drawn for the picture's
job) captioned with the reply when the platform can, and the picture job recorded as delivered with the reply.
A refused or failed picture is a line after the reply, which stays as it is. A platform that can put a picture on
a message it already posted (``attach_image``, Discord) gets the picture on the reply's last message, with the
progress shown under the reply's words meanwhile, and an image job's picture on its own status line: no second
message, unless the message was deleted meanwhile (then the picture is posted anew, with that message's text).

Every platform message id is recorded as the renderer returned it: ``messages`` are the ones showing the reply's
words, ``photos`` the ones showing a picture (an attached picture's id is in both), and once delivered the reply's
``Message.platform_reply_ids`` lists them all and the picture job's ``delivery`` names its ``photos``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bots.render import EditPacer, RetryLater, progress_text, stopping, strip_control, take_chunk
from core.db.models import Chat, Conversation, Job, Message, User, utcnow
from core.jobs import (
    TERMINAL_STATES,
    Done,
    Failed,
    ImageFollows,
    ImageReady,
    ImageRefused,
    JobEvent,
    JobKind,
    JobState,
    Progress,
    TextDelta,
)
from core.queue import position
from core.streams import Follow

if TYPE_CHECKING:
    from core.media import FileStore

__all__ = [
    "Action",
    "Deliveries",
    "Follow",
    "MessageGone",
    "RecipientGone",
    "Renderer",
    "Target",
]

log = logging.getLogger(__name__)

Action = Literal["typing", "upload_photo"]

_DELIVERED_KINDS = (JobKind.CHAT, JobKind.IMAGE)


@dataclass(frozen=True, slots=True)
class Target:
    """Where a job's result goes and for whom, rebuilt from SQL after a restart."""

    job_id: int
    kind: JobKind
    chat_id: str  # the platform's chat id
    reply_to: str | None = None  # the platform id of the user's message
    user_id: str | None = None  # the platform id of the requester (who may press the buttons)


class RecipientGone(Exception):
    """The platform will not deliver to this chat any more (the user blocked the bot, the bot left the group)."""


class MessageGone(Exception):
    """The message to edit or delete no longer exists (someone deleted it)."""


class Renderer(Protocol):
    """What a platform implements so that a job can be shown; raises RetryLater, RecipientGone, MessageGone."""

    limit: int  # longest message, in units of length()
    edit_interval: float  # seconds between two edits of one message
    action_interval: float  # seconds a chat action ("typing…") stays visible
    # Optional ``caption_limit: int``: a reply this short goes out as the caption of its scene picture.
    # Optional ``async attach_image(message_id, data, text) -> str``: put the picture (and its buttons) on a posted
    # message by editing it, the message then reading ``text``; raises MessageGone when that message is gone.

    def length(self, text: str) -> int:
        """Length of ``text`` in the platform's unit."""
        ...

    async def chat_action(self, action: Action) -> None:
        """Show that a reply (typing) or a picture (upload_photo) is on its way."""
        ...

    async def send_text(self, text: str) -> str:
        """Post a new message (a reply to the user's) and return its id."""
        ...

    async def edit_text(self, message_id: str, text: str) -> None:
        """Make a posted message read ``text``; an unchanged text is not an error."""
        ...

    async def send_image(self, data: bytes, caption: str) -> str:
        """Post a picture (with the platform's buttons for it) and return its message id."""
        ...

    async def delete(self, message_id: str) -> None:
        """Remove a status message that has served its purpose."""
        ...


class Deliveries:
    """Delivers jobs of one platform, each at most once per process, resumable after a restart."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        follow: Follow,
        files: FileStore,
        renderer_for: Callable[[Target], Renderer],
        platform: str,
        *,
        horizon_s: float = 3600.0,
    ) -> None:
        self._sessions = sessions
        self.follow = follow
        self._files = files
        self.renderer_for = renderer_for
        self.platform = platform
        self._horizon = dt.timedelta(seconds=horizon_s)
        self._running: dict[int, asyncio.Task[None]] = {}

    def start(self, target: Target, initial: Progress | None = None) -> asyncio.Task[None]:
        """Deliver in the background (or join the delivery already running for this job).

        ``initial`` is shown first: the queue position the chat service reported, before any worker speaks.
        """
        task = self._running.get(target.job_id)
        if task is None or task.done():
            task = asyncio.create_task(self._deliver(target, initial), name=f"deliver-job-{target.job_id}")
            self._running[target.job_id] = task
            task.add_done_callback(lambda _t, job_id=target.job_id: self._running.pop(job_id, None))
        return task

    async def resume(self) -> list[int]:
        """Start delivering every recent job of this platform that is not delivered yet; returns their ids."""
        targets = await asyncio.to_thread(self._undelivered)
        for target in targets:
            self.start(target)
        if targets:
            log.info("resuming %s unfinished deliveries", len(targets))
        return [target.job_id for target in targets]

    async def stop(self) -> None:
        """Stop every running delivery; what each had posted is recorded, and the next start resumes it."""
        tasks = list(self._running.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_all(self) -> None:
        """Wait for the deliveries running now (tests and shutdown)."""
        while self._running:
            await asyncio.gather(*list(self._running.values()), return_exceptions=True)

    async def _deliver(self, target: Target, initial: Progress | None) -> None:
        state = await asyncio.to_thread(self._claim, target)
        if state is None:
            return
        run = _Run(self, target, self.renderer_for(target), state)
        try:
            await run.run(initial)
        except RecipientGone:
            log.info("job %s: recipient gone, delivery skipped", target.job_id)
            await asyncio.to_thread(self._recipient_gone, target.job_id, run.state)
        except Exception:  # what was posted is recorded: the next start resumes from there
            log.exception("job %s: delivery failed; it resumes at the next start", target.job_id)

    # --- SQL (each in a worker thread: one short transaction) ---------------------------------------------

    def _claim(self, target: Target) -> dict[str, Any] | None:
        """The job's delivery state, with the target recorded; None when it is already delivered."""
        with self._sessions.begin() as session:
            job = session.get(Job, target.job_id)
            if job is None or job.delivered_at is not None:
                return None
            state = dict(job.delivery or {})
            state.setdefault("platform", self.platform)
            state.setdefault("target", {"chat_id": target.chat_id, "reply_to": target.reply_to, "user_id": target.user_id})
            job.delivery = state
            return state

    def adopt(
        self, picture_id: int, parent_id: int, photos: list[str] | None = None, *, delivered: bool = False
    ) -> None:
        """A reply's picture is delivered with the reply: never on its own, not even after a restart.

        Delivered, it records the messages that show it (what a button press wrote there, such as Accept, stays).
        """
        with self._sessions.begin() as session:
            job = session.get(Job, picture_id)
            if job is None:
                return
            job.delivery = {**(job.delivery or {}), "parent": parent_id, **({"photos": photos} if photos else {})}
            if delivered:
                job.delivered_at = utcnow()

    def save(self, job_id: int, state: dict[str, Any], *, delivered: bool = False) -> None:
        """Write the delivery state (a fresh dict, so that the JSON column sees the change).

        Once delivered, the reply's message row lists the platform messages that show it.
        """
        with self._sessions.begin() as session:
            job = session.get(Job, job_id)
            if job is None:
                return
            job.delivery = dict(state)
            if delivered:
                job.delivered_at = utcnow()
                reply = session.get(Message, job.reply_message_id) if job.reply_message_id else None
                if reply is not None:
                    shown = [*state.get("messages", ()), *state.get("photos", ())]
                    reply.platform_reply_ids = list(dict.fromkeys(shown))

    def snapshot(self, job_id: int) -> _Snapshot:
        """The job row's view of the job: state, queue position, stored reply and images."""
        with self._sessions() as session:
            job = session.get(Job, job_id)
            if job is None:
                return _Snapshot(JobState.FAILED, None, "", (), "This request no longer exists.")
            reply = session.get(Message, job.reply_message_id) if job.reply_message_id else None
            keys = tuple(reply.image_keys if reply and reply.image_keys else job.result.get("image_keys", ()))
            return _Snapshot(job.state, position(session, job_id), reply.text if reply else "", keys, job.error)

    def read_image(self, key: str) -> bytes:
        """An image's bytes from the file store."""
        return self._files.read(key)

    def _recipient_gone(self, job_id: int, state: dict[str, Any]) -> None:
        with self._sessions.begin() as session:
            job = session.get(Job, job_id)
            if job is None:
                return
            job.delivery = {**state, "skipped": "recipient gone"}
            job.delivered_at = utcnow()
            if job.user_id is not None and (user := session.get(User, job.user_id)) is not None:
                user.blocked_bot = True

    def _undelivered(self) -> list[Target]:
        since = utcnow() - self._horizon
        with self._sessions() as session:
            request = Message.__table__.alias("request")
            rows = session.execute(
                select(Job, Chat.platform_chat_id, request.c.platform_message_id, User.platform_user_id)
                .outerjoin(request, request.c.id == Job.request_message_id)
                .outerjoin(Conversation, Conversation.id == Job.conversation_id)
                .join(Chat, Chat.id == Conversation.chat_id)
                .outerjoin(User, User.id == Job.user_id)
                .where(
                    Job.delivered_at.is_(None),
                    Job.kind.in_([kind.value for kind in _DELIVERED_KINDS]),
                    Job.created_at >= since,
                    Chat.platform == self.platform,
                )
                .order_by(Job.id)
            ).all()
        targets = []
        for job, chat_id, reply_to, user_id in rows:
            if (job.delivery or {}).get("parent"):
                continue  # a reply's picture: its reply's delivery shows it
            recorded = (job.delivery or {}).get("target") or {}
            targets.append(
                Target(
                    job.id,
                    job.kind,
                    recorded.get("chat_id", chat_id),
                    recorded.get("reply_to", reply_to),
                    recorded.get("user_id", user_id),
                )
            )
        return targets


@dataclass(frozen=True, slots=True)
class _Snapshot:
    state: JobState
    position: int | None
    text: str
    image_keys: tuple[str, ...]
    error: str | None


class _Run:
    """One job's delivery: the streamed text, the status line, the images, persisted step by step.

    ``state`` (the ``Job.delivery`` JSON): ``messages`` are the text messages in order, the last one live;
    ``offset``/``carry`` say where the live message's text starts in the reply (see ``render.take_chunk``);
    ``status`` is the progress message of an image job; ``images`` the image keys already posted; ``picture`` the
    job id of the reply's scene picture, ``refused`` why it may not be made.
    """

    def __init__(self, owner: Deliveries, target: Target, renderer: Renderer, state: dict[str, Any]) -> None:
        self.owner = owner
        self.target = target
        self.renderer = renderer
        self.state: dict[str, Any] = {"messages": [], "offset": 0, "carry": "", "images": [], "photos": [], **state}
        self.text = ""
        self.action: Action | None = "upload_photo" if target.kind is JobKind.IMAGE else "typing"
        self.pacer: EditPacer | None = None
        self.status_pacer: EditPacer | None = None
        self.drawing = target.kind is JobKind.IMAGE  # progress renders as a picture's status line
        self.footer: EditPacer | None = None  # the progress under the reply's words, where its picture will go
        self._picture_renderer: Renderer | None = None

    async def run(self, initial: Progress | None = None) -> None:
        keepalive = asyncio.create_task(self._keep_action())
        try:
            if initial is not None:
                await self._show_progress(initial)
            await self._consume()
        finally:
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive

    async def _consume(self) -> None:
        await self._follow(self.target.job_id)
        picture = self.state.get("picture")
        if picture is not None and not self.state.get("delivered"):  # the reply is shown; its picture follows
            self.drawing = True
            await self._follow(int(picture))

    async def _follow(self, job_id: int) -> None:
        last_id = "0"  # always replay: the stream holds the whole reply, the state says what is shown already
        while True:
            try:
                async for entry_id, event in self.owner.follow(job_id, last_id):
                    last_id = entry_id
                    if await self._on_event(event):
                        return
            except TimeoutError:  # quiet stream: the job row says whether it waits, runs, or ended with its stream gone
                if stopping():
                    raise asyncio.CancelledError from None  # a stop that raced the read's timeout: never swallow it
            snapshot = await asyncio.to_thread(self.owner.snapshot, job_id)
            if snapshot.state in TERMINAL_STATES:
                await self._from_row(snapshot)
                return
            if snapshot.state is JobState.QUEUED:
                await self._on_event(Progress(stage="queued", position=snapshot.position))

    async def _on_event(self, event: JobEvent) -> bool:
        """Render one event; True when the delivery is complete."""
        if isinstance(event, TextDelta):
            self.text += strip_control(event.text)
            await self._show_text(final=False)
        elif isinstance(event, Progress) and event.stage == "retry":
            await self._restart_text(event.step)
        elif isinstance(event, Progress):
            await self._show_progress(event)
        elif isinstance(event, ImageReady):
            await self._show_image(event.key)
        elif isinstance(event, ImageFollows):
            if self.state.get("picture") != event.job_id:
                await asyncio.to_thread(self.owner.adopt, event.job_id, self.target.job_id)
                self.state["picture"] = event.job_id
                await self._save()
        elif isinstance(event, ImageRefused):
            self.state.setdefault("refused", event.reason)
        elif isinstance(event, Done):
            await self._finish()
            return True
        elif isinstance(event, Failed):
            await self._fail(event.error)
            return True
        return False

    async def _from_row(self, snapshot: _Snapshot) -> None:
        """Finish from the stored result when the event stream is gone (expired, or the bot was down long)."""
        if snapshot.state is JobState.DONE:
            if not (self.drawing and self.target.kind is JobKind.CHAT):  # a reply's picture keeps the reply's text
                self.text = strip_control(snapshot.text)
            for key in snapshot.image_keys:
                await self._show_image(key)
            await self._finish()
        else:
            await self._fail(snapshot.error or "The request was cancelled.")

    # --- text ---------------------------------------------------------------------------------------------

    async def _show_text(self, *, final: bool) -> None:
        """Spread the reply over messages: finished ones are final, the last one is edited as text arrives."""
        limit, length = self.renderer.limit, self.renderer.length
        while not self.state.get("captioned"):  # a captioned picture already shows the whole reply
            carry, offset = self.state["carry"], self.state["offset"]
            source = carry + self.text[offset:]
            if not source.strip():
                return
            self.state.pop("placeholder", None)
            chunk, next_carry, used = take_chunk(source, limit, length)
            if used == len(source):
                await self._set_live(chunk, final=final)
                return
            await self._set_live(chunk, final=True)  # this message is full: finish it, then open the next
            self.state["offset"] = offset + used - len(carry)
            self.state["carry"] = next_carry
            self.state["live_done"] = True
            await self._save()

    async def _restart_text(self, attempt: int) -> None:
        """A worker died mid-reply and a new attempt starts over: its text replaces what was shown.

        Replays (after a bot restart) reset the text again, but only a new attempt touches the posted messages:
        the first is kept and edited by the new text, the others are deleted.
        """
        self.text = ""
        if attempt <= self.state.get("attempt", 1):
            return
        await self._drop_pacer()
        first, *extra = self.state["messages"] or [None]
        for message_id in extra:
            with contextlib.suppress(MessageGone):
                await self.renderer.delete(message_id)
        self.state.update(attempt=attempt, messages=[first] if first else [], offset=0, carry="")
        self.state.pop("live_done", None)
        await self._save()

    async def _set_live(self, text: str, *, final: bool) -> None:
        if self.state.pop("live_done", False) or not self.state["messages"]:
            await self._drop_pacer()
            message_id = await self._retrying(self.renderer.send_text, text)
            self.state["messages"] = [*self.state["messages"], message_id]
            await self._save()
            self.pacer = self._new_pacer(message_id, sent=text)
        elif self.pacer is None:  # resumed (or the placeholder): the live message exists, its text is unknown
            self.pacer = self._new_pacer(self.state["messages"][-1], sent="")
        self.pacer.update(text)
        if final:
            await self.pacer.flush()
            if self.state.get("live_done"):  # the message vanished under the last edit: post the text anew
                await self._set_live(text, final=True)

    def _new_pacer(self, message_id: str, *, sent: str) -> EditPacer:
        renderer = self.renderer

        async def edit(text: str) -> None:
            try:
                await renderer.edit_text(message_id, text)
            except MessageGone:  # someone deleted it: later text goes to a new message
                log.info("job %s: message %s is gone", self.target.job_id, message_id)
                if self.state["messages"][-1:] == [message_id]:
                    self.state["live_done"] = True

        return EditPacer(edit, renderer.edit_interval, sent=sent)

    async def _drop_pacer(self) -> None:
        if self.pacer is not None:
            await self.pacer.flush()
            self.pacer = None

    # --- status, images, the end --------------------------------------------------------------------------

    async def _show_progress(self, progress: Progress) -> None:
        if not self.drawing:
            # A reply only says where it stands while it waits behind others; typing shows the rest.
            waiting = progress.stage == "queued" and (progress.position or 0) > 1
            if not self.text and (self.state.get("placeholder") or (waiting and not self.state["messages"])):
                self.state["placeholder"] = True
                await self._set_live(progress_text(progress, what="your reply"), final=False)
            return
        if self.state["images"]:
            return  # replayed after a restart: the picture is already there
        line = progress_text(progress)
        if self._show_footer(line) or self.footer is not None:  # a line too long for the footer is skipped
            return
        status = self.state.get("status")
        if status is None:
            status = await self._retrying(self.renderer.send_text, line)
            self.state["status"] = status
            await self._save()
            self.status_pacer = self._new_pacer(status, sent=line)
        elif self.status_pacer is None:
            self.status_pacer = self._new_pacer(status, sent="")
        self.status_pacer.update(line)

    def _attach_host(self) -> tuple[str, str] | None:
        """The posted message a picture goes on, and the text it keeps; None where it is posted as a new message.

        Only for platforms with ``attach_image``: a reply's picture goes on the reply's last message, which keeps its
        words; an image job's picture on its status line, which loses its text.
        """
        if not hasattr(self.renderer, "attach_image"):
            return None
        if self.target.kind is not JobKind.CHAT:
            status = self.state.get("status")
            return (status, "") if status is not None else None
        source = self.state["carry"] + self.text[self.state["offset"] :]
        words = take_chunk(source, self.renderer.limit, self.renderer.length)[0] if source.strip() else ""
        return (self.state["messages"][-1], words) if self.state["messages"] and words else None

    def _show_footer(self, line: str) -> bool:
        """Show a picture's progress (with "": nothing) under the reply's last message; False where it can't."""
        host = self._attach_host() if self.target.kind is JobKind.CHAT and "status" not in self.state else None
        if host is None:
            return False
        message_id, words = host
        text = f"{words}\n\n{line}" if line else words
        if self.renderer.length(text) > self.renderer.limit:
            return False
        if self.footer is None:
            self.footer = self._new_pacer(message_id, sent=words)
        self.footer.update(text)
        return True

    async def _attached(self, message_id: str, text: str, data: bytes) -> str:
        """The picture put on a posted message by editing it, or posted anew with that text if the message is gone."""
        for pacer in (self.footer, self.status_pacer):  # the progress shown on that message stops here
            if pacer is not None:
                await pacer.cancel()
        self.footer = None
        renderer = self._image_renderer()
        try:
            photo_id = await self._retrying(renderer.attach_image, message_id, data, text)  # type: ignore[attr-defined]
        except MessageGone:
            log.info("job %s: message %s is gone; the picture goes to a new one", self.target.job_id, message_id)
            photo_id = await self._retrying(renderer.send_image, data, text)
            if self.target.kind is JobKind.CHAT:  # the new message shows those words now
                self.state["messages"] = [*self.state["messages"][:-1], photo_id]
        if self.target.kind is not JobKind.CHAT:
            self.state.pop("status", None)  # the status line became the picture (or was gone)
        self.status_pacer = None
        return photo_id

    async def _show_image(self, key: str) -> None:
        if key in self.state["images"]:
            return
        if self.target.kind is JobKind.CHAT and not self.drawing:  # a reply's picture job: the words are final
            await self._show_text(final=True)  # the words first, then the scene they describe
        data = await asyncio.to_thread(self.owner.read_image, key)
        self.action = "upload_photo"
        host = self._attach_host()
        caption = self._caption() if host is None and self.target.kind is JobKind.CHAT else ""
        if host is not None:
            photo_id = await self._attached(*host, data)
        else:
            photo_id = await self._retrying(self._image_renderer().send_image, data, caption)
        self.state["images"] = [*self.state["images"], key]
        self.state["photos"] = [*self.state["photos"], photo_id]
        if caption:  # the photo now carries the words: the streamed message goes, and no text follows
            text_id = self.state["messages"][0]
            self.state.update(messages=[], captioned=True)
            await self._save()
            await self._drop_pacer()
            with contextlib.suppress(MessageGone):
                await self.renderer.delete(text_id)
        await self._save()
        await self._clear_status()

    def _image_renderer(self) -> Renderer:
        """A reply's picture is posted by a renderer for the picture's job, so that its buttons act on that job."""
        picture = self.state.get("picture")
        if picture is None or self.target.kind is not JobKind.CHAT:
            return self.renderer
        if self._picture_renderer is None:
            target = Target(int(picture), JobKind.IMAGE, self.target.chat_id, self.target.reply_to, self.target.user_id)
            self._picture_renderer = self.owner.renderer_for(target)
        return self._picture_renderer

    def _caption(self) -> str:
        """The whole reply, when the platform can show it as the picture's caption (one short message so far)."""
        limit = getattr(self.renderer, "caption_limit", 0)  # optional: platforms without captions leave it out
        text = self.text.strip()
        one_message = len(self.state["messages"]) == 1 and self.state["offset"] == 0 and not self.state["carry"]
        fits = bool(text) and self.renderer.length(text) <= limit
        return text if one_message and fits and self.state.get("images") == [] else ""

    async def _clear_status(self) -> None:
        status = self.state.pop("status", None)
        if self.status_pacer is not None:
            await self.status_pacer.cancel()
            self.status_pacer = None
        if status is not None:
            with contextlib.suppress(MessageGone):
                await self.renderer.delete(status)

    async def _finish(self) -> None:
        self.action = None
        if self.drawing and self.target.kind is JobKind.CHAT:  # the reply's picture is done
            if not self.state["images"]:
                await self._fail("The picture could not be made; the reply above stands.")
                return
        elif self.target.kind is JobKind.CHAT:
            if self.text.strip():
                await self._show_text(final=True)
            else:
                await self._set_live("⚠️ The reply came back empty. Please try again.", final=True)
            if self.state.get("refused") and not self.state.get("refusal_shown"):
                self.state.update(live_done=True, refusal_shown=True)
                await self._set_live(f"🖼️ {self.state['refused']}", final=True)
            if self.state.get("picture") is not None:  # the words are final; the reply's delivery goes on
                self.action = "upload_photo"
                await self._drop_pacer()
                await self._save()
                return
        elif not self.state["images"]:
            await self._fail("The picture could not be made. Please try again.")
            return
        await self._drop_pacer()
        await self._clear_status()
        await self._save(delivered=True)

    async def _fail(self, error: str) -> None:
        self.action = None
        line = f"⚠️ {error}"
        if self.drawing and self.target.kind is JobKind.CHAT:  # a picture failed: the reply stands as it is
            line = f"⚠️ The picture could not be made: {error}"
            if self.footer is not None:  # the progress under the reply becomes the error, or goes if it won't fit
                shown = self._show_footer(line)
                if not shown:
                    self._show_footer("")
                await self.footer.flush()
                self.footer = None
                if shown:
                    await self._save(delivered=True)
                    return
            self.state["live_done"] = True
        elif self.text.strip():
            await self._show_text(final=True)
            self.state["live_done"] = True  # the error gets its own message after the partial reply
        status = self.state.pop("status", None)
        if status is not None:  # an image job's status line becomes the error
            pacer = self.status_pacer or self._new_pacer(status, sent="")
            self.status_pacer = None
            pacer.update(line)
            await pacer.flush()
        else:
            await self._set_live(line, final=True)  # edits a placeholder, else posts the error
        await self._drop_pacer()
        await self._save(delivered=True)

    # --- plumbing ------------------------------------------------------------------------------------------

    async def _save(self, *, delivered: bool = False) -> None:
        if delivered:
            self.state["delivered"] = True
        await asyncio.to_thread(self.owner.save, self.target.job_id, self.state, delivered=delivered)
        picture = self.state.get("picture")
        if delivered and picture is not None and self.target.kind is JobKind.CHAT:
            photos = list(self.state["photos"])
            await asyncio.to_thread(self.owner.adopt, int(picture), self.target.job_id, photos, delivered=True)

    async def _retrying(self, call: Callable[..., Any], *args: Any) -> str:
        """A send that honours the platform's retry-after (edits are paced by EditPacer instead)."""
        while True:
            try:
                return str(await call(*args))
            except RetryLater as exc:
                log.info("job %s: send paced back by %.1f s", self.target.job_id, exc.retry_after)
                await asyncio.sleep(exc.retry_after)

    async def _keep_action(self) -> None:
        """Repeat the chat action while the job is on its way (a platform shows one for a few seconds only)."""
        while self.action is not None:
            try:
                await self.renderer.chat_action(self.action)
            except RecipientGone:
                return
            except Exception as exc:  # noqa: BLE001 - a lost "typing…" is cosmetic: never fail the delivery
                log.debug("chat action failed: %s", exc)
            await asyncio.sleep(self.renderer.action_interval)
