"""The paper's role-play, thinking and scene-image prompts (MODEL.md 8.1, 8.4)."""

from __future__ import annotations

from core.model.roleplay import (
    Thinking,
    parse_thinking,
    response_prompt,
    scene_image_prompt,
    thinking_prompt,
)


def test_response_prompt_without_and_with_history() -> None:
    plain = response_prompt("Ichihime", "A cat girl.", "Nya!", "Hi")
    assert plain == (
        "Character Description: A cat girl.\n\nOpening: Nya!\n\nUser Input: Hi\n\nBased on the character description, "
        "opening, conversation history, current user input, and the reference image, please generate Ichihime's "
        "response."
    )
    with_history = response_prompt("Ichihime", "A cat girl.", "Nya!", "Hi", [("user", "Yo"), ("machine", "Nya")])
    assert "Opening: Nya!\n\nConversation History:\nuser: Yo\nmachine: Nya\n\nUser Input: Hi\n\n" in with_history


def test_thinking_round_trip() -> None:
    prompt = thinking_prompt("A cat girl.", "Hi", "Hello!")
    assert prompt.startswith("You should first think") and prompt.endswith("generate an image for this scene.")
    parsed = parse_thinking("<think> plan it\n</think>\n<gen>cat girl waving, anime</gen>")
    assert parsed == Thinking("plan it", "cat girl waving, anime")
    assert parse_thinking("no tags") == Thinking("", "")


def test_scene_image_prompts() -> None:
    plain = scene_image_prompt("A cat girl.", "Hi", "Hello!")
    assert plain.startswith("Character Description: A cat girl.\n\nUser Input: Hi\n\nCharacter Response: Hello!\n\n")
    assert plain.endswith("based on the character description.")
    thought = scene_image_prompt("A cat girl.", "Hi", "Hello!", Thinking("plan", "waving"))
    assert "Thinking Process: plan\n\nGeneration Instruction: waving\n\n" in thought
    assert thought.endswith("thinking process, and generation instruction.")
