"""Chat, image and summary jobs: read the rows, run the model, stream events, store the result.

A reply's prompt is assembled by ``core.prompting`` (UniCharacter's role-play template with memory, within the
token budget); images the user sent go in as understanding (ViT) inputs. After a reply is stored, the same
transaction queues a low-priority SUMMARY job when ``core.memory`` says enough turns left the recent window; the
runner returns it so that it is dispatched after the commit. ORM objects stay inside the short sessions here;
the model only sees segments and images.

A reply may carry a scene picture (issue 8, ``core.imaging``): once the words are written, the chat's policy, an
ask in the user's words or the model's own thinking step decide; ``check_request`` may refuse (the reason goes to
the user beside the reply). A due picture is a separate IMAGE job on the image queue, announced on the chat job's
stream (``ImageFollows``) before its Done, so the text never waits and a failed picture leaves the reply intact.
"""

from __future__ import annotations

import io
import logging
import re
import time
from collections import namedtuple
from typing import TYPE_CHECKING, Any, Final

from PIL import Image
from sqlalchemy import Select, bindparam, select

from core.db import repositories as repo
from core.db.models import Character, Chat, Conversation, Message, User
from core.db.prepared import Prepared
from core.db.session import reading
from core.imaging import (
    ImagePolicy,
    PicturePlan,
    check_request,
    image_block_tokens,
    image_params,
    new_seed,
    params_record,
    plan_picture,
    replies_since_image,
    resolve_policy,
    sampler_params,
    scene_contexts,
)
from core.jobs import QUEUED_BEHIND, ImageFollows, ImageReady, ImageRefused, JobEvent, JobKind, Progress
from core.memory import index_reply, memory_context, note_conversation, store_summary, summary_due, summary_request
from core.model.api import TextParams
from core.model.roleplay import Thinking
from core.prompting import PromptTooLong, prompt_for
from workers.lifecycle import Claim, Deltas, JobError, Stop, Watch, complete, emit

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from workers.context import WorkerContext

__all__ = [
    "clean_text",
    "FollowUp",
    "HISTORY_TURNS",
    "run_chat",
    "run_image",
    "run_summary",
    "SUMMARY_TEMPERATURE",
]

logger = logging.getLogger(__name__)

FollowUp = tuple[int, JobKind]  # a job the runner queued, to dispatch after its commit
SUMMARY_TEMPERATURE = 0.3  # summaries should be faithful rather than creative
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # C0 controls but tab and newline: no frontend shows them
HISTORY_TURNS = 6  # recent turns a scene picture is conditioned on, besides the user's words and the reply


def clean_text(text: str) -> str:
    """Model text as stored and streamed: control characters removed (the same for a piece and the whole)."""
    return _CONTROL.sub("", text)


_READ: Final = (Conversation, Character, Chat, User, Message)  # what a job reads of its conversation


def _joined(*columns: Any) -> Select[Any]:
    """``columns`` of the job's conversation joined to its character, chat, user and (when still there) request."""
    return (
        select(*columns)
        .select_from(Conversation)
        .join(Character, Character.id == Conversation.character_id)
        .join(Chat, Chat.id == Conversation.chat_id)
        .join(User, User.id == Conversation.user_id)
        .outerjoin(Message, (Message.id == bindparam("message_id")) & (Message.conversation_id == Conversation.id))
        .where(Conversation.id == bindparam("conversation_id"))
    )


_ROWS = _joined(*_READ)  # one statement instead of five lookups
# a reply reads the same as plain rows: every column, named as the model's attribute (loading ORM rows cost twice
# the statement); one record type per model, filled from its slice of the row
_PLAIN_ROWS = Prepared(_joined(*(column for model in _READ for column in model.__table__.c)))
_RECORDS: Final = tuple(namedtuple(model.__name__, model.__table__.c.keys()) for model in _READ)  # type: ignore[misc]


def _params(claim: Claim) -> dict[str, Any]:
    """The bound values of ``_joined`` for the claimed job."""
    return {"conversation_id": claim.conversation_id, "message_id": claim.request_message_id}


def _rows(session: Session, claim: Claim) -> tuple[Conversation, Character, Chat, User, Message | None]:
    """The job's conversation with its character, chat and user, and the request message when it is still there,
    as ORM rows (a picture follows the character's reference images).

    Hold them: the session's identity map is weak.
    """
    row = session.execute(_ROWS, _params(claim)).one_or_none()
    if row is None:
        raise JobError("This conversation no longer exists.")
    return row.Conversation, row.Character, row.Chat, row.User, row.Message


def _plain_rows(session: Session, claim: Claim) -> tuple[Any, Any, Any, Any, Any | None]:
    """What ``_rows`` reads, as records with the models' column attributes (no relationships, no session)."""
    row = _PLAIN_ROWS.first(session, _params(claim))
    if row is None:
        raise JobError("This conversation no longer exists.")
    records, start = [], 0
    for record in _RECORDS:
        records.append(record._make(row[start : start + len(record._fields)]))
        start += len(record._fields)
    conversation, character, chat, user, message = records
    return conversation, character, chat, user, message if message.id is not None else None


def _adapter(ctx: WorkerContext, character: Character) -> str | None:
    """The character's trained adapter file, None for the base model with persona prompting."""
    return str(ctx.store.path(character.adapter_key)) if character.adapter_key else None


def _image(ctx: WorkerContext, key: str) -> Image.Image:
    with ctx.store.open(key) as blob:
        image = Image.open(blob)
        image.load()
    return image.convert("RGB")


def _device_name(model: object) -> str:
    """The accelerator a picture's GPU seconds were spent on (recorded with the job)."""
    device = getattr(model, "device", None)
    if getattr(device, "type", None) == "cuda":
        import torch  # only a runtime on CUDA gets here, and it has imported torch already

        return str(torch.cuda.get_device_name(device))
    return str(device) if device is not None else type(model).__name__


def _plan(ctx: WorkerContext, claim: Claim, watch: Watch, facts: dict[str, Any], reply: str) -> PicturePlan | None:
    """Whether the reply carries a picture; a failure here costs the picture, never the reply."""
    try:
        return plan_picture(
            ctx.model.get(), facts["policy"], ctx.settings, user_text=facts["user_text"], reply=reply,
            name=facts["name"], description=facts["description"], replies_since_last_image=facts["since"],
            adapter=facts["adapter"], on_text=lambda _piece: watch.check(),
        )
    except Stop:
        raise
    except Exception:
        logger.warning("job %s: deciding on a picture failed; the reply goes out without one", claim.job_id,
                       exc_info=True)
        return None


def _queue_picture(
    session: Session,
    ctx: WorkerContext,
    claim: Claim,
    facts: dict[str, Any],
    plan: PicturePlan,
    reply: str,
    reply_id: int | None,
) -> tuple[JobEvent, FollowUp | None]:
    """Inside the reply's transaction: the scene picture's IMAGE job, or the reason it may not be made."""
    chat, character = session.get(Chat, facts["chat_id"]), session.get(Character, facts["character_id"])
    instruction = plan.thinking.generation_instruction if plan.thinking else ""
    reason = check_request(
        session, ctx.settings, prompt=f"{facts['user_text']} {instruction}", user_id=facts["user_id"], chat=chat,
        character=character,  # type: ignore[arg-type]
    )
    if reason is not None:
        return ImageRefused(reason), None
    params = {
        "scene": True,
        "prompt": facts["user_text"],
        "reply": reply,
        "subject": plan.subject,
        "why": plan.why,
        "thinking": plan.thinking.thinking_process if plan.thinking else "",
        "instruction": instruction,
        "chat_id": facts["chat_id"],
        "reply_message_id": reply_id,
        **sampler_params(ctx.settings, new_seed()),
    }
    job_id = repo.insert_job(
        session, JobKind.IMAGE, facts["user_id"], facts["conversation_id"], claim.request_message_id, params
    )
    return ImageFollows(job_id), (job_id, JobKind.IMAGE)


def run_chat(ctx: WorkerContext, claim: Claim) -> list[FollowUp]:
    """An in-character reply, streamed as text deltas; may queue the rolling summary and the reply's picture."""
    settings, watch, model = ctx.settings, Watch(ctx, claim), ctx.model.get()
    # a read-only transaction (on SQLite no write lock): the chat's recall index is written with the reply
    with reading(ctx.sessionmaker) as session, session.begin():
        conversation, character, chat, user, message = _plain_rows(session, claim)
        if message is None:
            raise JobError("Your message was deleted before I could answer it.")
        note_conversation(session, conversation, chat, user, character)
        memory = memory_context(session, conversation, message, settings, index=False)
        policy = resolve_policy(character, chat)
        # only the auto policy paces pictures by replies; the count is a query, skipped otherwise
        since = replies_since_image(session, conversation.chat_id) if policy is ImagePolicy.AUTO else None
    adapter, conversation_id = _adapter(ctx, character), conversation.id
    facts = {
        "policy": policy, "user_text": message.text, "name": character.name,
        "description": character.description, "since": since,
        "adapter": adapter, "chat_id": conversation.chat_id, "character_id": character.id,
        "user_id": conversation.user_id, "conversation_id": conversation_id,
    }
    images = [_image(ctx, key) for key in message.image_keys]
    try:
        # image_tokens=0: the runtime does not yet say what an image costs; text is budgeted exactly
        prompt = prompt_for(character, user, memory, message.text, settings, model.count_tokens, images=images)
    except PromptTooLong as error:
        raise JobError("Your message does not fit in what I can read at once; please shorten it.") from error
    if claim.params.get(QUEUED_BEHIND):  # a queue line is shown: it turns to "working" until the text comes
        emit(ctx, claim.job_id, Progress(stage="text"))
    deltas = Deltas(ctx, claim.job_id)

    def on_text(piece: str) -> None:
        watch.check()
        if piece := clean_text(piece):
            deltas.add(piece)

    params = TextParams(settings.max_reply_tokens, settings.temperature, settings.top_p, claim.params.get("seed"))
    text = clean_text(model.generate_text(prompt.segments, params, on_text=on_text, adapter=adapter))
    watch.check()
    plan = _plan(ctx, claim, watch, facts, text.strip())
    follow_ups: list[FollowUp] = []
    events = deltas.rest()  # the text not sent yet, then what the transaction adds; published after it, before Done

    def queue_follow_ups(session: Session, reply_id: int | None) -> None:
        index_reply(session, conversation, memory, message, reply_id, text.strip(), settings)
        if summary_due(session, conversation, settings, memory.unsummarised):
            job_id = repo.insert_job(session, JobKind.SUMMARY, facts["user_id"], conversation_id)
            follow_ups.append((job_id, JobKind.SUMMARY))
        if plan is not None:
            event, picture = _queue_picture(session, ctx, claim, facts, plan, text.strip(), reply_id)
            events.append(event)
            follow_ups.extend([picture] if picture else [])

    result = {"chars": len(text), "dropped": prompt.dropped, "picture": plan.why if plan else None}
    complete(ctx, claim, text.strip(), result=result, before_done=events, write=queue_follow_ups)
    return follow_ups


def _history(session: Session, conversation_id: int, before_id: int | None, name: str) -> list[tuple[str, str]]:
    """The recent turns before the request, as (speaker, text) pairs, oldest first."""
    turns = repo.recent_messages(session, conversation_id, HISTORY_TURNS + 1, before_id)
    speaker = {"user": "User", "character": name}
    return [(speaker.get(t.role, t.role), t.text) for t in turns if t.id != before_id and t.text.strip()]


def run_image(ctx: WorkerContext, claim: Claim) -> list[FollowUp]:
    """A picture (/imagine, Regenerate, or a reply's scene), with step progress, stored in the file store.

    The job's params hold the scene and the sampler settings; the result records them with the GPU seconds.
    """
    settings, watch, model, p = ctx.settings, Watch(ctx, claim), ctx.model.get(), claim.params
    with ctx.sessionmaker() as session:
        conversation, character, _chat, _user, _message = _rows(session, claim)
        references, spent = [], 0
        for ref in character.reference_images:  # load only what fits the image context budget
            spent += image_block_tokens(ref.width, ref.height)
            if spent > settings.image_context_tokens:
                break
            references.append(_image(ctx, ref.file_key))
        thinking = Thinking(p.get("thinking", ""), p["instruction"]) if p.get("instruction") else None
        contexts = scene_contexts(
            description=character.description,
            history=_history(session, conversation.id, claim.request_message_id, character.name),
            user_text=str(p.get("prompt", "")),
            reply=str(p.get("reply", "")),
            references=references,
            budget_tokens=settings.image_context_tokens,
            subject=p.get("subject", "self"),
            thinking=thinking,
        )
        adapter = _adapter(ctx, character)
    params = image_params(p, settings)
    emit(ctx, claim.job_id, Progress(stage="image"))  # the model reports the total with its first step

    def on_progress(step: int, total: int) -> None:
        watch.check()
        emit(ctx, claim.job_id, Progress(stage="image", step=step, total=total))

    started = time.perf_counter()
    image = model.generate_image(contexts, params, on_progress=on_progress, adapter=adapter)
    gpu_s = time.perf_counter() - started
    watch.check()
    out = io.BytesIO()
    image.convert("RGB").save(out, format="PNG")
    key = ctx.store.put(out.getvalue(), ".png")
    ready = ImageReady(key=key, width=image.width, height=image.height, seed=params.seed or 0)
    result = {
        "image_keys": [key],
        "seed": params.seed,
        "params": params_record(params),
        "gpu_s": round(gpu_s, 3),
        "device": _device_name(model),
        "references": len(references),
    }
    if not p.get("scene"):  # /imagine: the picture is its own turn
        complete(ctx, claim, "", [key], result, before_done=[ready])
        return []

    def attach(session: Session, _reply_id: int | None) -> None:  # a scene picture belongs to the reply it shows
        reply = session.get(Message, p["reply_message_id"]) if p.get("reply_message_id") else None
        if reply is not None:
            reply.image_keys = [*reply.image_keys, key]

    complete(ctx, claim, None, result=result, before_done=[ready], write=attach)
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

    def keep(session: Session, _reply_id: int | None) -> None:
        store_summary(session, request.conversation_id, text, request.covers_until_message_id)

    complete(ctx, claim, None, result={"summarised": True}, write=keep)
    return []
