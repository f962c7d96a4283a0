"""Prompt assembly: a character, a user and their memory into the model's segments, within a token budget.

The text is UniCharacter's role-play template (MODEL.md 8.1, built by ``core.model.roleplay.response_prompt``),
the format its SFT data taught the model::

    Character Description: ...\n\nOpening: ...\n\nConversation History:\n{speaker}: {text}\n...User Input: ...
    \n\nBased on the character description, ..., please generate {Name}'s response.

The extra context this project adds (card fields, lorebook hits, the user's persona, facts, the rolling summary,
recalled turns, example dialogues) goes in labelled paragraphs of the description part. Images the user sent come
first, as ViT blocks, as in BAGEL's understanding layout (MODEL.md 6). Every part is costed with the model's own
tokenizer and taken most important first; from the first part that does not fit, every less important part is
dropped too, so what is lost is always the least important: example dialogues, older history, recalled turns,
extracted facts, lorebook entries, opening, summary, card fields, pinned facts, the latest turns (history stays
contiguous). The character's description, the user's persona and the new message are never dropped (a description
too long for the budget is cut short); :class:`Prompt` says what went in and what did not.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Final

from core.cards import scan_lorebook
from core.db.models import Character, Conversation, User
from core.memory import MemoryContext, memory_context
from core.model.api import ImageSegment, Segment, TextSegment
from core.model.roleplay import response_prompt

if TYPE_CHECKING:
    from PIL import Image
    from sqlalchemy.orm import Session

    from core.config import Settings
    from core.db.models import Message

__all__ = ["Prompt", "PromptInputs", "PromptTooLong", "build_prompt", "assemble_prompt", "inputs_for", "prompt_for"]

log = logging.getLogger(__name__)

LATEST_TURNS: Final = 4  # the newest turns rank just below the never-dropped parts
# The description part's paragraphs, in order, with their headings.
_CONTEXT_SECTIONS: Final = (
    ("description", ""),
    ("card", ""),
    ("system", ""),
    ("lore", "World Info:\n"),
    ("persona", ""),
    ("facts", "What {char} knows about {user}:\n"),
    ("summary", "The story so far: "),
    ("recalled", "Earlier moments:\n"),
    ("examples", "Example dialogues:\n"),
)
_MACRO = re.compile(r"\{\{(char|user)\}\}|<(BOT|USER)>", re.IGNORECASE)


class PromptTooLong(ValueError):
    """The parts that are never dropped do not fit the budget."""


@dataclass(frozen=True, slots=True)
class PromptInputs:
    """Everything a prompt is made of, loaded already (no SQL here)."""

    character_name: str
    description: str
    message: str
    user_name: str = "User"
    persona: str = ""
    personality: str = ""
    scenario: str = ""
    opening: str = ""
    example_dialogues: str = ""
    system_prompt: str = ""
    post_history: str = ""
    character_book: dict[str, Any] | None = None
    memory: MemoryContext = field(default_factory=lambda: MemoryContext([], "", [], [], []))
    images: Sequence[Image.Image] = ()


@dataclass(frozen=True, slots=True)
class Prompt:
    """The segments for ``CharacterModel.generate_text`` and, for debugging, what went in and what was dropped."""

    segments: list[Segment]
    text: str
    tokens: int  # an upper bound, counted part by part with the model's tokenizer (images included)
    budget: int
    included: list[str]
    dropped: list[str]


@dataclass(slots=True)
class _Piece:
    """One candidate part of the prompt, with its importance and token cost."""

    key: str  # what it is, for Prompt.included / dropped
    section: str
    text: str
    rank: float  # lower is more important; 0 is never dropped
    cost: int = 0
    role: str = ""  # history lines: the speaker

    @property
    def line(self) -> str:
        """The text as the prompt shows it."""
        return f"{self.role}: {self.text}" if self.role else self.text


def _expand(text: str, char: str, user: str) -> str:
    """Card macros ({{char}}, {{user}}, <BOT>, <USER>) replaced by the names."""
    return _MACRO.sub(lambda m: char if (m.group(1) or m.group(2)).lower() in ("char", "bot") else user, text)


def _pieces(inputs: PromptInputs, count_tokens: Callable[[str], int], lore_budget: int) -> list[_Piece]:
    """Every candidate part of the prompt with its rank."""
    char, user, memory = inputs.character_name, inputs.user_name, inputs.memory
    pieces = [
        _Piece("description", "description", inputs.description.strip(), 0),
        _Piece("message", "message", inputs.message.strip(), 0),
    ]
    if inputs.persona.strip():
        pieces.append(_Piece("persona", "persona", f"About {user}: {inputs.persona.strip()}", 0))
    for key, section, text, label, rank in (
        ("personality", "card", inputs.personality, "Personality: ", 25),
        ("scenario", "card", inputs.scenario, "Scenario: ", 26),
        ("system_prompt", "system", inputs.system_prompt, "", 27),
        ("post_history", "post", inputs.post_history, "", 27.5),
        ("summary", "summary", memory.summary, "", 30),
        ("opening", "opening", inputs.opening, "", 35),
    ):
        if text.strip():
            pieces.append(_Piece(key, section, label + text.strip(), rank))
    pieces += [_Piece(f"pinned[{i}]", "facts", f"- {t}", 20 + i / 100) for i, t in enumerate(memory.pinned)]
    pieces += [_Piece(f"extracted[{i}]", "facts", f"- {t}", 45 + i / 100) for i, t in enumerate(memory.extracted)]
    scanned = [turn.text for turn in memory.window] + [inputs.message]
    for i, hit in enumerate(scan_lorebook(inputs.character_book, scanned, count_tokens, lore_budget)):
        pieces.append(_Piece(f"lore[{i}]", "lore", f"- {hit.content.strip()}", 40 + i / 100))
    for age, turn in enumerate(reversed(memory.window)):  # newest first
        rank = 10 + age / 100 if age < LATEST_TURNS else 50 + age / 100
        pieces.append(_Piece(f"history[{turn.message_id}]", "history", turn.text, rank, role=turn.speaker))
    # a turn recalled for its relevance beats an old one that is merely recent
    for i, turn in enumerate(memory.recalled):
        pieces.append(_Piece(f"recalled[{turn.message_id}]", "recalled", turn.text, 48 + i / 100, role=turn.speaker))
    blocks = [b.strip() for b in re.split(r"(?im)^\s*<START>\s*$", inputs.example_dialogues) if b.strip()]
    pieces += [_Piece(f"example[{i}]", "examples", f"<START>\n{b}", 300 + i) for i, b in enumerate(blocks)]
    for piece in pieces:
        piece.text = _expand(piece.text, char, user)
    return pieces


def _render(pieces: Sequence[_Piece], inputs: PromptInputs) -> str:
    """The prompt text of the chosen pieces: the paper's template, our context in its description part."""
    by_section: dict[str, list[_Piece]] = {}
    for piece in sorted(pieces, key=lambda p: p.rank):
        by_section.setdefault(piece.section, []).append(piece)
    blocks = []
    for section, heading in _CONTEXT_SECTIONS:
        if section in by_section:
            heading = heading.format(char=inputs.character_name, user=inputs.user_name)
            blocks.append(heading + "\n".join(p.line for p in by_section[section]))
    history = sorted(by_section.get("history", []), key=lambda p: -p.rank)  # oldest first: ranks grow with age
    user_text = "\n\n".join(p.text for p in by_section.get("message", []) + by_section.get("post", []))
    return response_prompt(
        inputs.character_name,
        "\n\n".join(blocks),
        "".join(p.text for p in by_section.get("opening", [])),
        user_text,
        [(p.role, p.text) for p in history],
    )


@lru_cache(maxsize=8)
def _memoized(count_tokens: Callable[[str], int]) -> Callable[[str], int]:
    """``count_tokens`` with a cache: card fields, facts and most of the window recur from one reply to the next."""
    return lru_cache(maxsize=16384)(count_tokens)


def _fit_required(
    required: list[_Piece], inputs: PromptInputs, count_tokens: Callable[[str], int], budget: int, estimate: int
) -> int:
    """Tokens of the never-dropped parts, after cutting the description to fit; PromptTooLong if they cannot."""
    if estimate <= budget:
        return estimate
    description = next(p for p in required if p.key == "description")
    tokens = count_tokens(_render(required, inputs))
    while tokens > budget:
        if not description.text:
            raise PromptTooLong(
                f"the message, persona and template alone take {tokens} tokens; the budget is {budget}. "
                "Please shorten them."
            )
        share = max(0, description.cost - (tokens - budget) - 1) / max(description.cost, 1)
        description.text = description.text[: int(len(description.text) * share)].rstrip()
        description.cost = count_tokens(description.text + "\n")
        description.key = "description(cut)"
        tokens = count_tokens(_render(required, inputs))
    return tokens


def build_prompt(
    inputs: PromptInputs,
    count_tokens: Callable[[str], int],
    budget: int,
    *,
    lore_budget: int = 512,
    image_tokens: int = 0,
) -> Prompt:
    """The prompt of ``inputs`` within ``budget`` tokens (``image_tokens`` per user image, counted in).

    Parts are counted one by one, each with the line break that ends it, plus every heading; since the text splits
    into the same pre-tokens at those line breaks, the sum bounds the whole text's count from above, and no
    part is tokenized twice (the counts are cached across calls).
    """
    count = _memoized(count_tokens)
    marker = count("")  # the segment markers count_tokens adds to every call
    pieces = _pieces(inputs, count, lore_budget)
    for piece in pieces:
        piece.cost = count(piece.line + "\n") - marker
    text_budget = budget - image_tokens * len(inputs.images)
    skeleton = count(response_prompt(inputs.character_name, "", "", "", []))  # the template's own words
    required = [p for p in pieces if p.rank == 0]
    used = _fit_required(required, inputs, count, text_budget, skeleton + sum(p.cost for p in required))
    headings = {name: count(heading) - marker + 2 for name, heading in _CONTEXT_SECTIONS}
    headings["history"] = count("Conversation History:") - marker + 2
    chosen, dropped = list(required), []
    sections = {p.section for p in required} | {"opening", "message", "post"}
    full = False
    for piece in sorted((p for p in pieces if p.rank > 0), key=lambda p: p.rank):
        cost = piece.cost + (0 if piece.section in sections else headings[piece.section])
        full = full or used + cost > text_budget
        if full:  # from the first part that does not fit, everything less important goes too (history stays whole)
            dropped.append(piece)
            continue
        chosen.append(piece)
        sections.add(piece.section)
        used += cost
    if dropped:
        log.debug("prompt for %s dropped %d parts", inputs.character_name, len(dropped))
    text = _render(chosen, inputs)
    segments: list[Segment] = [ImageSegment(image, vit=True) for image in inputs.images]
    segments.append(TextSegment(text))
    return Prompt(
        segments=segments,
        text=text,
        tokens=used + image_tokens * len(inputs.images),
        budget=budget,
        included=[p.key for p in sorted(chosen, key=lambda p: p.rank)],
        dropped=[p.key for p in sorted(dropped, key=lambda p: p.rank)],
    )


def inputs_for(
    character: Character,
    user: User,
    memory: MemoryContext,
    message: str,
    images: Sequence[Image.Image] = (),
) -> PromptInputs:
    """The prompt inputs of a character and a user (card fields beyond the columns come from the stored card)."""
    data = (character.card or {}).get("data", {})
    return PromptInputs(
        character_name=character.name,
        description=character.description,
        message=message,
        user_name=user.display_name or "User",
        persona=user.persona,
        personality=character.style_notes,
        scenario=character.scenario,
        opening=character.greeting,
        example_dialogues=character.example_dialogues,
        system_prompt=data.get("system_prompt") or "",
        post_history=data.get("post_history_instructions") or "",
        character_book=data.get("character_book"),
        memory=memory,
        images=images,
    )


def prompt_for(
    character: Character,
    user: User,
    memory: MemoryContext,
    new_message: str,
    settings: Settings,
    count_tokens: Callable[[str], int],
    *,
    images: Sequence[Image.Image] = (),
    image_tokens: int = 0,
) -> Prompt:
    """The prompt replying to ``new_message`` with ``memory`` read already, within context_tokens minus the reply.

    No SQL: a worker builds it after its read transaction ended.
    """
    return build_prompt(
        inputs_for(character, user, memory, new_message, images),
        count_tokens,
        settings.context_tokens - settings.max_reply_tokens,
        lore_budget=settings.lorebook_tokens,
        image_tokens=image_tokens,
    )


def assemble_prompt(
    session: Session,
    conversation: Conversation,
    new_message: Message,
    settings: Settings,
    count_tokens: Callable[[str], int],
    *,
    images: Sequence[Image.Image] = (),
    image_tokens: int = 0,
) -> Prompt:
    """The prompt for replying to ``new_message`` (stored already), within context_tokens minus the reply."""
    character = session.get(Character, conversation.character_id)
    user = session.get(User, conversation.user_id)
    if character is None or user is None:
        raise LookupError(f"conversation {conversation.id} has no character or user")
    memory = memory_context(session, conversation, new_message, settings)
    return prompt_for(
        character, user, memory, new_message.text, settings, count_tokens, images=images, image_tokens=image_tokens
    )
