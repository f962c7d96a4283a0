"""When a character's reply carries a picture, what the picture is conditioned on, and what it may cost.

Notable:

- **Policy** per character (the card's default) and per chat (set by admins, wins): ``never``, ``on_request``,
  ``auto``. :func:`resolve_policy`.
- **Asks** ("send me a pic", "selfie?", "draw us at the beach") are detected in two stages. A lexical scorer
  knows the *shapes* of a request (a request verb aimed at the character, a picture noun, a question about looks)
  and of a non-request (negation, past tense, talk about one's own pictures). Clear cases end there; the unclear
  middle goes to the model's own understanding: a greedy yes/no question about the message. An answer the model
  does not give clearly (the tiny random model, say) falls back to the lexical lean. :func:`detect_ask`.
- **Auto** images come from UniCharacter's thinking mode (MODEL.md 8.4): the reply carries an image only when the
  plan holds a ``<gen>`` instruction, and never more often than the per-chat spacing allows. :func:`auto_allowed`.
- **Conditioning**: the scene prompt holds the persona, the recent turns, the user's words and the reply just
  written; the character's reference images go in context (VAE and ViT blocks) while they fit the image context
  budget. CFG contexts follow MODEL.md 5.4. :func:`scene_contexts`.
- **Cost and safety**: per-user and per-chat daily quotas counted from the job rows, a ban list, NSFW only where
  the chat and the deployment allow it, and real people only with attested consent. :func:`check_request`.
- **The decision after a reply** puts these together: :func:`plan_picture`. An image job's params hold the scene
  and every sampler setting (:func:`sampler_params`), so a Regenerate changes only the seed and an admin can
  reproduce any picture (:func:`image_params`).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from sqlalchemy import Select, func, select

from core.db.models import Conversation, Job, Message, utcnow
from core.jobs import JobKind, JobState
from core.model.api import ImageContexts, ImageParams, ImageSegment, Segment, TextParams, TextSegment
from core.model.roleplay import Thinking, parse_thinking, scene_image_prompt, thinking_prompt
from core.wording import counted

if TYPE_CHECKING:
    from PIL import Image
    from sqlalchemy import ColumnElement
    from sqlalchemy.orm import Session

    from core.config import Settings
    from core.db.models import Character, Chat
    from core.model.api import CharacterModel

__all__ = [
    "ImagePolicy",
    "Subject",
    "AskVerdict",
    "resolve_policy",
    "lexical_ask",
    "detect_ask",
    "auto_allowed",
    "replies_since_image",
    "PicturePlan",
    "plan_picture",
    "check_request",
    "new_seed",
    "params_record",
    "sampler_params",
    "image_params",
    "image_block_tokens",
    "scene_contexts",
]


class ImagePolicy(str, enum.Enum):
    """Whether replies in a chat may carry pictures."""

    NEVER = "never"
    ON_REQUEST = "on_request"
    AUTO = "auto"


Subject = Literal["self", "scene", "thing"]


def resolve_policy(character: Character, chat: Chat | None) -> ImagePolicy:
    """The chat's policy when an admin set one, else the character card's default."""
    value = (chat.image_policy if chat is not None else None) or character.image_policy
    try:
        return ImagePolicy(value)
    except ValueError:
        return ImagePolicy.ON_REQUEST


# --- asks -----------------------------------------------------------------------------------------------------

_PICTURE = r"(?:pics?|pix|pictures?|photos?|photographs?|selfies?|images?|snaps?(?:hots?)?|portraits?|drawings?|" \
    r"sketch(?:es)?|paintings?|illustrations?|shots?|screenshots?)"
_REQUEST_VERB = r"(?:send|show|draw|paint|sketch|snap|take|share|post|drop|give|make|create|generate|render|picture)"
_STRONG: Final = [
    re.compile(rf"\b(?:send|show|give|share|post|drop)\s+(?:me|us)\b.*\b{_PICTURE}\b"),
    re.compile(r"\b(?:draw|paint|sketch|picture|illustrate|render)\s+(?:me|us|you|yourself|your|a|an|the|what|how)\b"),
    re.compile(rf"\b(?:take|snap)\s+(?:a|another|one|some)?\s*{_PICTURE}\b"),
    re.compile(rf"^\W*{_PICTURE}\W*(?:\?|pls|please|plz)+"),
    re.compile(rf"\b(?:can|could|would|will|may)\s+(?:i|we)\s+(?:see|get|have)\b.*\b(?:{_PICTURE}|you|your|it)\b"),
    re.compile(r"\b(?:let|lemme)\s+(?:me|us)\s+see\b"),
    re.compile(r"\bshow\s+(?:me|us)\b"),
    re.compile(r"\bwhat\s+(?:do|does)\s+(?:you|your\s+\w+|it|that|the\s+\w+)\s+look\s+like\b"),
    re.compile(rf"\b(?:a|another|one more)\s+{_PICTURE}\s+(?:of|from)\b"),
    re.compile(rf"\b(?:i\s+(?:want|wanna|would love|'d love|need)\s+(?:to\s+see|a|an|some))\b.*\b(?:{_PICTURE}|you)\b"),
]
_WEAK: Final = [
    re.compile(rf"\b{_PICTURE}\b"),
    re.compile(rf"\b{_REQUEST_VERB}\b"),
    re.compile(r"\b(?:look|see|wearing|outfit|looks)\b"),
]
_AGAINST: Final = [
    re.compile(rf"\b(?:don'?t|do not|never|no|stop|without)\b\W+(?:\w+\W+){{0,2}}(?:{_REQUEST_VERB}|{_PICTURE}|see)\b"),
    re.compile(r"\b(?:i|we)\s+(?:saw|took|sent|drew|painted|posted|shared|made|have|had|love|like)\b"),
    re.compile(rf"\b(?:my|our|his|her|their)\s+(?:\w+\s+)?{_PICTURE}\b"),
    re.compile(r"\b(?:yesterday|last\s+(?:week|night|time|year))\b"),
]
_SCENE = re.compile(r"\b(?:us|we|together|both\s+of\s+us|here|this\s+place|the\s+scene|around\s+you)\b")
_YOU = re.compile(r"\b(?:you|yourself|you're|selfie)\b")
_DET_NOUN = re.compile(r"\b(?:the|a|an|this|that)\s+(?:[a-z]+\s+)?([a-z]+)\b")
_YOUR_NOUN = re.compile(r"\byour\s+(?:[a-z]+\s+)?([a-z]+)\b")
_LOOKS: Final = frozenset(
    "face outfit outfits clothes dress hair eyes look looks selfie ears tail smile uniform costume shoes hat".split()
)


@dataclass(frozen=True, slots=True)
class AskVerdict:
    """Whether a message asks for a picture, of what, and which stage decided."""

    asked: bool
    subject: Subject
    score: float  # the lexical score, 0..1
    decided_by: Literal["lexicon", "model"]


_RECIPIENT = re.compile(r"\b(show|send|give|share|post|drop)\s+(?:me|us)\b")  # "show us X": us receives, X is shown


def _subject(text: str) -> Subject:
    text = _RECIPIENT.sub(r"\1", text)
    if _SCENE.search(text):
        return "scene"
    nouns = _YOUR_NOUN.findall(text)
    if nouns and not any(noun in _LOOKS for noun in nouns):
        return "thing"
    if _YOU.search(text):
        return "self"
    objects = [noun for noun in _DET_NOUN.findall(text) if not re.fullmatch(_PICTURE, noun) and noun not in _LOOKS]
    return "thing" if objects else "self"


def lexical_ask(text: str) -> tuple[float, Subject]:
    """A 0..1 score of how much ``text`` reads as a request for a picture, and who or what it would show."""
    lowered = " ".join(text.lower().split())
    score = 0.8 if any(p.search(lowered) for p in _STRONG) else 0.0
    score += 0.2 * sum(1 for p in _WEAK if p.search(lowered))
    score -= 0.6 * sum(1 for p in _AGAINST if p.search(lowered))
    if lowered.rstrip().endswith("?"):
        score += 0.1
    return max(0.0, min(1.0, score)), _subject(lowered)


_CLEAR_YES: Final = 0.75
_CLEAR_NO: Final = 0.25


def detect_ask(text: str, model: CharacterModel | None = None, character_name: str = "the character") -> AskVerdict:
    """Decide whether ``text`` asks for a picture: the lexicon for clear cases, the model for the rest."""
    score, subject = lexical_ask(text)
    if score >= _CLEAR_YES or score <= _CLEAR_NO or model is None:
        return AskVerdict(score >= 0.5, subject, score, "lexicon")
    question = (
        f'A user wrote to {character_name}: "{text}"\n\n'
        f"Is the user asking {character_name} to send, show or draw a picture? Answer yes or no."
    )
    answer = model.generate_text([TextSegment(question)], TextParams(max_new_tokens=3, temperature=0.0)).lower()
    if re.match(r"\W*yes\b", answer):
        return AskVerdict(True, subject, score, "model")
    if re.match(r"\W*no\b", answer):
        return AskVerdict(False, subject, score, "model")
    return AskVerdict(score >= 0.5, subject, score, "lexicon")


# --- auto images ----------------------------------------------------------------------------------------------


def auto_allowed(thinking: Thinking, replies_since_last_image: int | None, settings: Settings) -> bool:
    """An auto image is drawn when the plan holds an instruction and the chat's spacing allows another."""
    if not thinking.generation_instruction:
        return False
    return replies_since_last_image is None or replies_since_last_image >= settings.auto_image_every


def _live_images(*where: ColumnElement[bool]) -> list[ColumnElement[bool]]:
    """The clauses of image jobs that count (neither failed nor cancelled), plus ``where``."""
    return [Job.kind == JobKind.IMAGE, Job.state.not_in([JobState.FAILED, JobState.CANCELLED]), *where]


def _of_chat(chat_id: int) -> ColumnElement[bool]:
    """The chat's jobs, found through its conversations' indexes (never a read of every image job)."""
    return Job.conversation_id.in_(select(Conversation.id).where(Conversation.chat_id == chat_id))


def _last_image(chat_id: int) -> Select[tuple[dt.datetime, int | None]]:
    """When the chat's latest picture was queued, and the message that asked for it."""
    return (
        select(Job.created_at, Job.request_message_id)
        .where(*_live_images(_of_chat(chat_id)))
        .order_by(Job.id.desc())
        .limit(1)
    )


def replies_since_image(session: Session, chat_id: int) -> int | None:
    """Character replies in the chat since its last picture was queued; None when it never had one."""
    last = session.execute(_last_image(chat_id)).first()
    if last is None:
        return None
    queued_at, asked_in = last
    return session.scalar(
        select(func.count(Message.id)).where(
            Message.chat_id == chat_id,
            Message.id > (asked_in or 0),  # the replies since come after the asking message: an index range
            Message.role == "character",
            Message.created_at > queued_at,
        )
    ) or 0


@dataclass(frozen=True, slots=True)
class PicturePlan:
    """A picture is due after a reply: of what, the thinking step's plan (auto), and why."""

    subject: Subject
    thinking: Thinking | None
    why: Literal["asked", "auto"]


THINKING_TOKENS: Final = 192  # the plan is a few sentences and one instruction line
THINKING_TEMPERATURE: Final = 0.3  # the paper's thinking call decodes near-greedily (MODEL.md 8.4)


def plan_picture(
    model: CharacterModel,
    policy: ImagePolicy,
    settings: Settings,
    *,
    user_text: str,
    reply: str,
    name: str,
    description: str,
    replies_since_last_image: int | None,
    adapter: str | None = None,
    on_text: Callable[[str], None] | None = None,
) -> PicturePlan | None:
    """Whether the reply just written carries a picture: an ask (any policy but never), or the model's plan (auto)."""
    if policy is ImagePolicy.NEVER or not user_text.strip():
        return None
    verdict = detect_ask(user_text, model, name)
    if verdict.asked:
        return PicturePlan(verdict.subject, None, "asked")
    if policy is not ImagePolicy.AUTO:
        return None
    if replies_since_last_image is not None and replies_since_last_image < settings.auto_image_every:
        return None  # too soon for another: skip the thinking call altogether
    params = TextParams(max_new_tokens=THINKING_TOKENS, temperature=THINKING_TEMPERATURE, top_p=1.0)
    prompt = [TextSegment(thinking_prompt(description, user_text, reply))]
    thinking = parse_thinking(model.generate_text(prompt, params, on_text=on_text, adapter=adapter))
    if not auto_allowed(thinking, replies_since_last_image, settings):
        return None
    return PicturePlan(verdict.subject, thinking, "auto")


def new_seed() -> int:
    """A fresh positive seed (0 would mean "random" to some callers)."""
    return secrets.randbelow(2**31 - 1) + 1


_SAMPLER_FIELDS: Final = tuple(f.name for f in dataclasses.fields(ImageParams))


def params_record(params: ImageParams) -> dict[str, Any]:
    """Sampler settings as JSON, for ``Job.params`` and ``Job.result``."""
    return dataclasses.asdict(params) | {"cfg_interval": list(params.cfg_interval)}


def sampler_params(settings: Settings, seed: int) -> dict[str, Any]:
    """Every sampler setting of a new picture under the deployment's preset, as JSON for ``Job.params``."""
    width, height, steps = settings.image_shape
    return params_record(ImageParams(width=width, height=height, num_timesteps=steps, seed=seed))


def image_params(stored: Mapping[str, Any], settings: Settings) -> ImageParams:
    """The sampler settings a job stored (those it lacks from the preset, a missing seed drawn fresh)."""
    values = sampler_params(settings, int(stored.get("seed") or new_seed()))
    values.update({name: stored[name] for name in _SAMPLER_FIELDS if stored.get(name) is not None})
    values["cfg_interval"] = tuple(values["cfg_interval"])
    return ImageParams(**values)


# --- cost and safety ------------------------------------------------------------------------------------------


def _count_images_since(since: dt.datetime, *where: ColumnElement[bool]) -> Select[tuple[int]]:
    """Image jobs created since ``since`` that match ``where``, failures and cancellations not counted."""
    return select(func.count(Job.id)).where(*_live_images(Job.created_at >= since, *where))


def _images_since(session: Session, since: dt.datetime, *where: ColumnElement[bool]) -> int:
    """How many: :func:`_count_images_since`."""
    return session.scalar(_count_images_since(since, *where)) or 0


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower()))


def check_request(
    session: Session,
    settings: Settings,
    *,
    prompt: str,
    user_id: int,
    chat: Chat | None,
    character: Character,
) -> str | None:
    """Why this picture may not be made (a message fit for the user), or None when it may."""
    words = _words(prompt)
    banned = words & {w.lower() for w in settings.image_banned_words}
    if banned:
        return "I can't draw that: the request contains words this server does not allow."
    wants_nsfw = bool(words & {w.lower() for w in settings.image_nsfw_words})
    if wants_nsfw or character.nsfw:
        if not settings.allow_nsfw_images:
            return "This deployment does not make adult images."
        if chat is None or not chat.nsfw_allowed:
            return "Adult images are only made in age-restricted channels."
    if character.real_person and not character.consent_attested:
        return f"{character.name} depicts a real person without recorded consent, so I can't make pictures of them."
    day_ago = utcnow() - dt.timedelta(days=1)
    if _images_since(session, day_ago, Job.user_id == user_id) >= settings.image_quota_user_per_day:
        return (
            f"You have used your {counted(settings.image_quota_user_per_day, 'picture')} for today. "
            "Text replies still work; try pictures again tomorrow."
        )
    chat_cap = settings.image_quota_chat_per_day
    if chat is not None and chat_cap and _images_since(session, day_ago, _of_chat(chat.id)) >= chat_cap:
        return f"This chat has used its {counted(chat_cap, 'picture')} for today."
    return None


# --- conditioning ---------------------------------------------------------------------------------------------


def image_block_tokens(width: int, height: int) -> int:
    """Context tokens one reference image costs as a VAE block plus a ViT block, markers included."""
    vae = (height // 16) * (width // 16) + 2
    vit = (min(height, 980) // 14) * (min(width, 980) // 14) + 2
    return vae + vit


_SUBJECT_HINT: Final[dict[Subject, str]] = {
    "self": "Show the character themself, as the user asked.",
    "scene": "Show the scene the user describes, with the character and the user in it.",
    "thing": "Show the thing the user asks about, as it belongs to the character's world.",
}


def scene_contexts(
    *,
    description: str,
    history: Sequence[tuple[str, str]],
    user_text: str,
    reply: str,
    references: Sequence[Image.Image],
    budget_tokens: int,
    subject: Subject = "self",
    thinking: Thinking | None = None,
) -> ImageContexts:
    """The CFG contexts of a scene image: reference images (while they fit), then the scene prompt.

    ``history`` holds ``(speaker, text)`` pairs of the recent turns, oldest first; they extend the user input so
    the picture shows what happened. With reference images the image-unconditional branch drops them (MODEL.md
    5.4, edit); without, it equals the conditional one and is skipped.
    """
    recent = "".join(f"{speaker}: {text}\n" for speaker, text in history)
    situation = f"{recent}{user_text}" if recent else user_text
    prompt = scene_image_prompt(description, situation, reply, thinking) + " " + _SUBJECT_HINT[subject]
    images: list[Segment] = []
    spent = 0
    for image in references:
        cost = image_block_tokens(*image.size)
        if spent + cost > budget_tokens:
            break
        images.append(ImageSegment(image, vit=True, vae=True))
        spent += cost
    text = TextSegment(prompt)
    if not images:
        return ImageContexts(cond=[text], text_uncond=[], image_uncond=None)
    return ImageContexts(cond=[*images, text], text_uncond=images, image_uncond=[text])
