"""Chat, image and summary jobs: read the rows, run the model, stream events, store the result.

A reply's prompt is assembled by ``core.prompting`` (UniCharacter's role-play template with memory, within the
token budget); images the user sent go in as understanding (ViT) inputs. After a reply is stored, the same
transaction queues a low-priority SUMMARY job when ``core.memory`` says enough turns left the recent window; the
runner returns it so that it is dispatched after the commit. ORM objects stay inside the short sessions here;
the model only sees segments and images.
"""

from __future__ import annotations

import io
import logging
import re
import secrets
from typing import TYPE_CHECKING

from PIL import Image

from core.db import repositories as repo
from core.db.models import Character, Conversation, Message
from core.jobs import ImageReady, JobKind, Progress, TextDelta
from core.memory import store_summary, summary_due, summary_request
from core.model.api import ImageContexts, ImageParams, TextParams, TextSegment
from core.prompting import PromptTooLong, assemble_prompt
from workers.lifecycle import Claim, JobError, Watch, complete, emit

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from workers.context import WorkerContext

__all__ = [
    "clean_text",
    "FollowUp",
    "build_image_contexts",
    "run_chat",
    "run_image",
    "run_summary",
    "SUMMARY_TEMPERATURE",
]

logger = logging.getLogger(__name__)

FollowUp = tuple[int, JobKind]  # a job the runner queued, to dispatch after its commit
SUMMARY_TEMPERATURE = 0.3  # summaries should be faithful rather than creative
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # C0 controls but tab and newline: no frontend shows them


def clean_text(text: str) -> str:
    """Model text as stored and streamed: control characters removed (the same for a piece and the whole)."""
    return _CONTROL.sub("", text)


def _rows(session: Session, claim: Claim) -> tuple[Conversation, Character]:
    conversation = session.get(Conversation, claim.conversation_id) if claim.conversation_id else None
    character = session.get(Character, conversation.character_id) if conversation else None
    if conversation is None or character is None:
        raise JobError("This conversation no longer exists.")
    return conversation, character


def _adapter(ctx: WorkerContext, character: Character) -> str | None:
    """The character's trained adapter file, None for the base model with persona prompting."""
    return str(ctx.store.path(character.adapter_key)) if character.adapter_key else None


def _image(ctx: WorkerContext, key: str) -> Image.Image:
    with ctx.store.open(key) as blob:
        image = Image.open(blob)
        image.load()
    return image.convert("RGB")


def build_image_contexts(character_name: str, prompt: str) -> ImageContexts:
    """Text-to-image contexts for /imagine: the character's name leads the caption; unconditional is empty."""
    return ImageContexts(cond=[TextSegment(f"{character_name}. {prompt}")], text_uncond=())


def run_chat(ctx: WorkerContext, claim: Claim) -> list[FollowUp]:
    """An in-character reply, streamed as text deltas; may queue the conversation's rolling summary."""
    settings, watch, model = ctx.settings, Watch(ctx, claim), ctx.model.get()
    with ctx.sessionmaker.begin() as session:  # begin: recall indexes new turns as it reads
        conversation, character = _rows(session, claim)
        message = session.get(Message, claim.request_message_id) if claim.request_message_id else None
        if message is None:
            raise JobError("Your message was deleted before I could answer it.")
        images = [_image(ctx, key) for key in message.image_keys]
        try:
            # image_tokens=0: the runtime does not yet say what an image costs; text is budgeted exactly
            prompt = assemble_prompt(session, conversation, message, settings, model.count_tokens, images=images)
        except PromptTooLong as error:
            raise JobError("Your message does not fit in what I can read at once; please shorten it.") from error
        adapter, conversation_id = _adapter(ctx, character), conversation.id
    emit(ctx, claim.job_id, Progress(stage="text"))

    def on_text(piece: str) -> None:
        watch.check()
        if piece := clean_text(piece):
            emit(ctx, claim.job_id, TextDelta(piece))

    params = TextParams(settings.max_reply_tokens, settings.temperature, settings.top_p, claim.params.get("seed"))
    text = clean_text(model.generate_text(prompt.segments, params, on_text=on_text, adapter=adapter))
    watch.check()
    follow_ups: list[FollowUp] = []

    def queue_summary(session: Session) -> None:
        conversation = session.get(Conversation, conversation_id)
        if conversation is not None and summary_due(session, conversation, settings):
            job = repo.create_job(session, JobKind.SUMMARY, conversation.user_id, conversation.id)
            follow_ups.append((job.id, JobKind.SUMMARY))

    complete(ctx, claim, text.strip(), result={"chars": len(text), "dropped": prompt.dropped}, write=queue_summary)
    return follow_ups


def run_image(ctx: WorkerContext, claim: Claim) -> list[FollowUp]:
    """/imagine: a picture of the character, with step progress, stored in the file store."""
    settings, watch, model = ctx.settings, Watch(ctx, claim), ctx.model.get()
    with ctx.sessionmaker() as session:
        _conversation, character = _rows(session, claim)
        contexts = build_image_contexts(character.name, str(claim.params.get("prompt", "")))
        adapter = _adapter(ctx, character)
    seed = int(claim.params.get("seed") or secrets.randbelow(2**31 - 1) + 1)
    params = ImageParams(
        width=settings.image_width, height=settings.image_height, num_timesteps=settings.image_steps, seed=seed
    )
    emit(ctx, claim.job_id, Progress(stage="image"))  # the model reports the total with its first step

    def on_progress(step: int, total: int) -> None:
        watch.check()
        emit(ctx, claim.job_id, Progress(stage="image", step=step, total=total))

    image = model.generate_image(contexts, params, on_progress=on_progress, adapter=adapter)
    watch.check()
    out = io.BytesIO()
    image.convert("RGB").save(out, format="PNG")
    key = ctx.store.put(out.getvalue(), ".png")
    ready = ImageReady(key=key, width=image.width, height=image.height, seed=seed)
    complete(ctx, claim, "", [key], {"image_keys": [key], "seed": seed}, before_done=[ready])
    return []


def run_summary(ctx: WorkerContext, claim: Claim) -> list[FollowUp]:
    """Fold the turns that left the recent window into the conversation's rolling summary (no reply message)."""
    settings, watch, model = ctx.settings, Watch(ctx, claim), ctx.model.get()
    with ctx.sessionmaker() as session:
        conversation = session.get(Conversation, claim.conversation_id) if claim.conversation_id else None
        request = summary_request(session, conversation, settings, model.count_tokens) if conversation else None
    if request is None:  # forgotten, or already covered by an earlier run
        complete(ctx, claim, None, result={"summarised": False})
        return []
    params = TextParams(max_new_tokens=request.max_new_tokens, temperature=SUMMARY_TEMPERATURE, top_p=1.0)
    text = model.generate_text(request.segments, params, on_text=lambda _piece: watch.check())

    def keep(session: Session) -> None:
        store_summary(session, request.conversation_id, text, request.covers_until_message_id)

    complete(ctx, claim, None, result={"summarised": True}, write=keep)
    return []
