"""Prompt assembly: the paper's template, the token budget with the tiny model's tokenizer, what is dropped first."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from core.db.models import Character, Chat, Conversation, Message, User
from core.memory import MemoryContext, Turn
from core.model.api import ImageSegment, TextSegment
from core.model.roleplay import response_prompt
from core.model.tokenizer import load_tokenizer
from core.prompting import PromptInputs, PromptTooLong, assemble_prompt, build_prompt
from tests.conftest import make_settings


@pytest.fixture(scope="module")
def count_tokens(tiny_model_dir: Path) -> Callable[[str], int]:
    """The tiny model's tokenizer: one segment's tokens, markers included (as CharacterModel.count_tokens)."""
    tokenizer = load_tokenizer(tiny_model_dir)
    return lambda text: len(tokenizer.segment(text))


def turns(n: int, start: int = 0) -> list[Turn]:
    return [
        Turn(i, "user" if i % 2 == 0 else "character", "Ann" if i % 2 == 0 else "Mio", f"line {i} of the story")
        for i in range(start, start + n)
    ]


def full_inputs(**overrides) -> PromptInputs:
    values = dict(
        character_name="Mio",
        description="Mio is a quiet librarian who adores {{user}}'s stories.",
        message="Shall we read the red book tonight?",
        user_name="Ann",
        persona="Ann is a sailor back from the sea.",
        personality="shy, precise",
        scenario="A library after closing time.",
        opening="Shh... the library is closed, but you may stay.",
        example_dialogues="<START>\n{{user}}: Hi\n{{char}}: Shh.\n<START>\n{{user}}: Book?\n{{char}}: Aisle three.",
        character_book={"entries": [{"keys": ["red book"], "content": "The red book is cursed.", "extensions": {}}]},
        memory=MemoryContext(
            window=turns(12),
            summary="Ann met Mio in the library.",
            pinned=["Ann is afraid of spiders"],
            extracted=["Ann owns a boat"],
            recalled=[Turn(-1, "user", "Ann", "My boat is called the Heron.")],
        ),
    )
    return PromptInputs(**(values | overrides))


def test_without_extras_it_is_the_papers_template(count_tokens) -> None:
    inputs = PromptInputs(
        character_name="Mio", description="A librarian.", message="Hi!", opening="Shh.",
        memory=MemoryContext(turns(2), "", [], [], []),
    )
    prompt = build_prompt(inputs, count_tokens, 4000)
    expected = response_prompt("Mio", "A librarian.", "Shh.", "Hi!", [("Ann", "line 0 of the story"),
                                                                       ("Mio", "line 1 of the story")])
    assert prompt.segments == [TextSegment(expected)]
    assert prompt.text.startswith("Character Description: A librarian.\n\nOpening: Shh.\n\nConversation History:\n")
    assert prompt.dropped == []


def test_everything_fits_in_a_large_budget(count_tokens) -> None:
    prompt = build_prompt(full_inputs(), count_tokens, 20_000)
    text = prompt.text
    assert prompt.dropped == []
    for part in ("adores Ann's stories", "Personality: shy, precise", "Scenario: A library", "The red book is cursed",
                 "About Ann: Ann is a sailor", "- Ann is afraid of spiders", "- Ann owns a boat",
                 "The story so far: Ann met Mio", "Ann: My boat is called the Heron.", "Ann: Hi\nMio: Shh.",
                 "Opening: Shh...", "Ann: line 0 of the story\n", "User Input: Shall we read the red book tonight?"):
        assert part in text, part
    assert text.index("line 10") < text.index("line 11") < text.index("User Input:")
    assert count_tokens(text) <= prompt.tokens <= count_tokens(text) * 1.05  # counted in parts: a tight bound


ODD = ["東京タワーで会いましょう。", "Wait... what?!\n\n  (spaces)  ", "emoji 🐱🎴 and tabs\tend", "'s 're \"quoted\":", "1234.5678"]


@pytest.mark.parametrize("budget", [300, 600, 5000])
def test_the_count_bounds_the_text_whatever_it_holds(budget, count_tokens) -> None:
    window = [Turn(i, "user", "Ann", ODD[i % len(ODD)] * (1 + i % 3)) for i in range(15)]
    inputs = full_inputs(
        description="Mio. " + ODD[0], message=ODD[1] + ODD[2], persona=ODD[3],
        memory=MemoryContext(window, ODD[4], ODD[:2], ODD[2:], window[:2]),
    )
    prompt = build_prompt(inputs, count_tokens, budget)
    assert count_tokens(prompt.text) <= prompt.tokens <= budget


# Importance of each part, most important first; the fixture's window holds turns 0..11 (8..11 are the latest).
IMPORTANCE = ["latest", "pinned", "personality", "scenario", "summary", "opening", "lore", "extracted", "recalled",
              "older", "example"]


def _kind(key: str) -> str:
    kind = key.split("[")[0]
    if kind == "history":
        return "latest" if int(key[8:-1]) >= 8 else "older"
    return kind


@pytest.mark.parametrize("budget", [250, 320, 400, 500, 700])
def test_budget_respected_and_least_important_dropped_first(budget, count_tokens) -> None:
    prompt = build_prompt(full_inputs(), count_tokens, budget)
    assert count_tokens(prompt.text) <= budget
    assert "Mio is a quiet librarian who adores Ann's stories." in prompt.text
    assert "About Ann: Ann is a sailor back from the sea." in prompt.text
    assert "User Input: Shall we read the red book tonight?" in prompt.text
    assert prompt.dropped
    kept = {IMPORTANCE.index(_kind(k)) for k in prompt.included if _kind(k) in IMPORTANCE}
    lost = {IMPORTANCE.index(_kind(k)) for k in prompt.dropped}
    assert max(kept, default=-1) <= min(lost)  # what was dropped is less important than anything kept


def test_history_is_contiguous_newest_kept(count_tokens) -> None:
    prompt = build_prompt(full_inputs(), count_tokens, 400)
    kept = [int(key[8:-1]) for key in prompt.included if key.startswith("history[")]
    assert kept and sorted(kept) == list(range(12 - len(kept), 12))  # the newest turns, no gaps


def test_description_is_cut_not_dropped(count_tokens) -> None:
    long = "Mio keeps a very long diary. " * 400
    prompt = build_prompt(full_inputs(description=long), count_tokens, 500)
    assert count_tokens(prompt.text) <= 500
    assert "description(cut)" in prompt.included
    assert "Character Description: Mio keeps a very long diary." in prompt.text


def test_message_too_long_for_the_budget_is_refused(count_tokens) -> None:
    with pytest.raises(PromptTooLong, match="budget is 200"):
        build_prompt(full_inputs(message="word " * 500), count_tokens, 200)


def test_user_images_become_vit_segments_and_count(count_tokens) -> None:
    image = Image.new("RGB", (8, 8))
    inputs = full_inputs(images=[image, image])
    prompt = build_prompt(inputs, count_tokens, 600, image_tokens=100)
    assert prompt.segments[:2] == [ImageSegment(image, vit=True), ImageSegment(image, vit=True)]
    assert isinstance(prompt.segments[2], TextSegment)
    assert count_tokens(prompt.text) + 200 <= prompt.tokens <= 600


def _store_conversation(session, n: int) -> tuple[Conversation, Message]:
    user = User(platform="console", platform_user_id="ann", display_name="Ann", persona="A sailor.")
    chat = Chat(platform="console", platform_chat_id="dm")
    character = Character(
        name="Mio",
        description="A librarian.",
        greeting="Shh.",
        card={"spec": "chara_card_v2", "data": {"name": "Mio", "post_history_instructions": "Stay in character.",
                                                "character_book": {"entries": [{"keys": ["heron"],
                                                                                "content": "Herons fish."}]}}},
    )
    session.add_all([user, chat, character])
    session.flush()
    conversation = Conversation(user_id=user.id, character_id=character.id, chat_id=chat.id)
    session.add(conversation)
    session.flush()
    session.add_all(
        Message(conversation_id=conversation.id, chat_id=chat.id, role="user" if i % 2 == 0 else "character",
                text=f"message {i}: the heron flew over the harbour" if i == 3 else f"message {i}: nothing new")
        for i in range(n)
    )
    new = Message(conversation_id=conversation.id, chat_id=chat.id, role="user", text="Where did the heron fly?")
    session.add(new)
    session.flush()
    return conversation, new


def test_long_stored_history_within_budget(sessionmaker, tmp_path, count_tokens) -> None:
    settings = make_settings(tmp_path, context_tokens=800, max_reply_tokens=200, history_messages=40, recall_turns=4)
    with sessionmaker.begin() as session:
        conversation, new = _store_conversation(session, 2000)
        prompt = assemble_prompt(session, conversation, new, settings, count_tokens)
    assert count_tokens(prompt.text) <= 600
    assert "About Ann: A sailor." in prompt.text and "User Input: Where did the heron fly?" in prompt.text
    assert "Stay in character." in prompt.text and "Herons fish." in prompt.text
    assert "message 1999: nothing new" in prompt.text and "message 1958" not in prompt.text
    assert "message 3: the heron flew over the harbour" in prompt.text  # recalled from far back
    assert any(key.startswith("history[") for key in prompt.dropped)
