"""Chat and image jobs: read the rows into a plain request, run the model, stream events, store the reply.

The prompt follows the UniCharacter role-play template (MODEL.md 8.1): one human turn with the character
description, the opening, the conversation history trimmed to the token budget, and the user's input; images the
user sent come before it as understanding (ViT) inputs. ``build_chat_context`` and ``build_image_contexts`` are
the seams where the richer prompt assembly (memory, summaries, example dialogues) plugs in.
"""

from __future__ import annotations

import io
import logging
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING

from PIL import Image

from core.db import repositories as repo
from core.db.models import Character, Conversation, User
from core.jobs import ImageReady, Progress, TextDelta
from core.model.api import ImageContexts, ImageParams, ImageSegment, Segment, TextParams, TextSegment
from workers.lifecycle import Claim, Watch, complete, emit

if TYPE_CHECKING:
    from collections.abc import Callable

    from sqlalchemy.orm import Session

    from core.config import Settings
    from core.model.api import CharacterModel
    from workers.context import WorkerContext

__all__ = [
    "Turn",
    "Persona",
    "ChatRequest",
    "load_request",
    "build_chat_context",
    "build_image_contexts",
    "run_chat",
    "run_image",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Turn:
    """One stored message, as plain data."""

    role: str  # user | character | system
    text: str
    image_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Persona:
    """The character fields a prompt uses."""

    name: str
    description: str
    greeting: str = ""
    scenario: str = ""
    style_notes: str = ""
    adapter_key: str | None = None


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """Everything a reply needs, read in one short transaction; ``history[-1]`` is the new user message."""

    persona: Persona
    user_name: str
    history: tuple[Turn, ...]


def load_request(session: Session, claim: Claim, settings: Settings) -> ChatRequest:
    """The job's character, user and recent turns up to its request message."""
    conversation = session.get(Conversation, claim.conversation_id) if claim.conversation_id else None
    if conversation is None:
        raise LookupError(f"job {claim.job_id} has no conversation")
    character = session.get(Character, conversation.character_id)
    user = session.get(User, conversation.user_id)
    assert character is not None and user is not None  # foreign keys
    turns = repo.recent_messages(session, conversation.id, settings.history_messages, claim.request_message_id)
    persona = Persona(
        name=character.name,
        description=character.description,
        greeting=character.greeting,
        scenario=character.scenario,
        style_notes=character.style_notes,
        adapter_key=character.adapter_key,
    )
    history = tuple(Turn(m.role, m.text, tuple(m.image_keys)) for m in turns)
    return ChatRequest(persona, user.display_name or "User", history)


def _roleplay_prompt(request: ChatRequest, history: tuple[Turn, ...]) -> str:
    """MODEL.md 8.1's role-play human turn."""
    persona = request.persona
    *earlier, new = history
    description = "\n\n".join(p for p in (persona.description, persona.scenario, persona.style_notes) if p)
    parts = [f"Character Description: {description}", f"Opening: {persona.greeting}"]
    if earlier:
        speaker = {"user": request.user_name, "character": persona.name}
        lines = "\n".join(f"{speaker.get(t.role, t.role)}: {t.text}" for t in earlier if t.text)
        parts.append(f"Conversation History:\n{lines}")
    parts.append(f"User Input: {new.text}")
    parts.append(
        "Based on the character description, opening, conversation history, current user input, and the "
        f"reference image, please generate {persona.name}'s response."
    )
    return "\n\n".join(parts)


def build_chat_context(
    request: ChatRequest, model: CharacterModel, budget: int, load_image: Callable[[str], Image.Image]
) -> list[Segment]:
    """The reply's context: the user's new images, then the role-play prompt with as much history as fits."""
    history = request.history
    prompt = _roleplay_prompt(request, history)
    while len(history) > 1 and model.count_tokens(prompt) > budget:  # drop the oldest turns first
        history = history[1:]
        prompt = _roleplay_prompt(request, history)
    images: list[Segment] = [ImageSegment(load_image(key), vit=True) for key in history[-1].image_keys]
    return [*images, TextSegment(prompt)]


def build_image_contexts(persona: Persona, prompt: str) -> ImageContexts:
    """Text-to-image contexts for /imagine: the character's name leads the caption; unconditional is empty."""
    return ImageContexts(cond=[TextSegment(f"{persona.name}. {prompt}")], text_uncond=())


def _adapter(ctx: WorkerContext, persona: Persona) -> str | None:
    return str(ctx.store.path(persona.adapter_key)) if persona.adapter_key else None


def _load_image(ctx: WorkerContext) -> Callable[[str], Image.Image]:
    def load(key: str) -> Image.Image:
        with ctx.store.open(key) as blob:
            image = Image.open(blob)
            image.load()
        return image.convert("RGB")

    return load


def _read(ctx: WorkerContext, claim: Claim) -> ChatRequest:
    with ctx.sessionmaker() as session:
        return load_request(session, claim, ctx.settings)


def run_chat(ctx: WorkerContext, claim: Claim) -> None:
    """An in-character reply, streamed as text deltas."""
    settings, watch = ctx.settings, Watch(ctx, claim)
    request = _read(ctx, claim)
    model = ctx.model.get()
    context = build_chat_context(
        request, model, settings.context_tokens - settings.max_reply_tokens, _load_image(ctx)
    )
    emit(ctx, claim.job_id, Progress(stage="text"))

    def on_text(piece: str) -> None:
        watch.check()
        if piece:
            emit(ctx, claim.job_id, TextDelta(piece))

    params = TextParams(
        max_new_tokens=settings.max_reply_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        seed=claim.params.get("seed"),
    )
    text = model.generate_text(context, params, on_text=on_text, adapter=_adapter(ctx, request.persona))
    watch.check()
    complete(ctx, claim, text.strip(), result={"chars": len(text)})


def run_image(ctx: WorkerContext, claim: Claim) -> None:
    """/imagine: a picture of the character, with step progress, stored in the file store."""
    settings, watch = ctx.settings, Watch(ctx, claim)
    request = _read(ctx, claim)
    seed = int(claim.params.get("seed") or secrets.randbelow(2**31 - 1) + 1)
    params = ImageParams(
        width=settings.image_width, height=settings.image_height, num_timesteps=settings.image_steps, seed=seed
    )
    model = ctx.model.get()
    emit(ctx, claim.job_id, Progress(stage="image", step=0, total=params.num_timesteps))

    def on_progress(step: int, total: int) -> None:
        watch.check()
        emit(ctx, claim.job_id, Progress(stage="image", step=step, total=total))

    contexts = build_image_contexts(request.persona, str(claim.params.get("prompt", "")))
    image = model.generate_image(contexts, params, on_progress=on_progress, adapter=_adapter(ctx, request.persona))
    watch.check()
    out = io.BytesIO()
    image.convert("RGB").save(out, format="PNG")
    key = ctx.store.put(out.getvalue(), ".png")
    ready = ImageReady(key=key, width=image.width, height=image.height, seed=seed)
    complete(ctx, claim, "", [key], {"image_keys": [key], "seed": seed}, before_done=[ready])
