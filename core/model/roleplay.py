"""UniCharacter's role-play prompts (MODEL.md 8.1, 8.4): the reply prompt, the thinking step and the scene image.

These are the texts the model was fine-tuned on (RoleScape-20's processed files and the paper's inference API),
so they are reproduced word for word; pure functions on strings. The official API drops the text prompt when a
reference image is passed (a quirk, MODEL.md 8.4); callers here put reference images *and* the prompt in context.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "THINK_INSTRUCTION",
    "Thinking",
    "parse_thinking",
    "response_prompt",
    "scene_image_prompt",
    "thinking_prompt",
]

THINK_INSTRUCTION = (
    "You should first think about the planning process in the mind and then generate the image.\n"
    "The planning process must be enclosed within <think></think>.\n"
    "Then provide a concise, standardized generation instruction enclosed within <gen></gen> that can be fed to a "
    "text-to-image model.\n"
    "The <gen> instruction should be a single descriptive sentence or a short list of comma-separated attributes, "
    "focusing on character, pose/expression, scene context, composition, style, and quality words.\n"
    "Output format (no additional text):\n<think>...your planning process...</think>\n"
    "<gen>...your generation instruction...</gen>\n"
)

_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_GEN = re.compile(r"<gen>(.*?)</gen>", re.DOTALL)


@dataclass(frozen=True, slots=True)
class Thinking:
    """The planning text and the one-line image instruction parsed from a thinking reply."""

    thinking_process: str
    generation_instruction: str


def response_prompt(
    name: str, description: str, opening: str, user_text: str, history: Iterable[tuple[str, str]] = ()
) -> str:
    """The human turn asking for the character's reply; ``history`` is ``(role, text)`` pairs, oldest first."""
    prompt = f"Character Description: {description}\n\nOpening: {opening}\n\n"
    lines = "".join(f"{role}: {text}\n" for role, text in history)
    if lines:
        prompt += f"Conversation History:\n{lines}\n"
    return (
        prompt + f"User Input: {user_text}\n\n"
        "Based on the character description, opening, conversation history, current user input, and the reference "
        f"image, please generate {name}'s response."
    )


def thinking_prompt(description: str, user_text: str, response: str) -> str:
    """The separate understanding call that plans the scene image (decoded greedily at temperature 0.3)."""
    return (
        f"{THINK_INSTRUCTION}\n\nCharacter Description: {description}\n\nUser Input: {user_text}\n\n"
        f"Character Response: {response}\n\nPlease think about how to generate an image for this scene."
    )


def parse_thinking(text: str) -> Thinking:
    """Pull ``<think>`` and ``<gen>`` out of a reply; a missing tag gives an empty string."""
    think, gen = _THINK.search(text), _GEN.search(text)
    return Thinking(
        thinking_process=think.group(1).strip() if think else "",
        generation_instruction=gen.group(1).strip() if gen else "",
    )


def scene_image_prompt(description: str, user_text: str, response: str, thinking: Thinking | None = None) -> str:
    """The text-to-image prompt for the scene after a reply (the SFT ``_t2i`` caption format)."""
    prompt = f"Character Description: {description}\n\nUser Input: {user_text}\n\nCharacter Response: {response}\n\n"
    if thinking is None:
        return prompt + (
            "Please generate an image that visualizes this scene with the character responding to the user's input "
            "based on the character description."
        )
    return prompt + (
        f"Thinking Process: {thinking.thinking_process}\n\n"
        f"Generation Instruction: {thinking.generation_instruction}\n\n"
        "Please generate an image that visualizes this scene with the character responding to the user's input "
        "based on the character description, thinking process, and generation instruction."
    )
