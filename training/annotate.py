"""Training data for one character from 10 images and a persona, with the base model's own understanding.

Each image is captioned by the model itself (``CharacterModel.generate_text`` on ``[ImageSegment, question]``,
greedy): appearance, outfit, art style. From the captions, the description, the greeting and the example dialogues
come the samples of the Unified-SFT mixture (MODEL.md 8.1, 8.2), in the segment format of training/packing.py:

- group ``t2i``: the short caption (``pure_t2i``) and the description-conditioned prompt (``t2i``) -> the image;
- group ``vlm``: appearance VQA on the ViT image, role-play turns in the paper's prompt template (the greeting as
  the answer to a first hello, then every character turn of the example dialogues), knowledge QA on the persona.

A seeded split holds out images (identity references for evaluation) and dialogue turns (persona QA). Everything is
written as JSONL next to the job, so an admin can read what the character will be trained on.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from core.model.api import CharacterModel, ImageSegment, TextParams, TextSegment
from training.packing import ImagePart, Sample, TextPart

__all__ = [
    "QUESTIONS",
    "Annotation",
    "Caption",
    "Persona",
    "annotate",
    "build_samples",
    "caption_images",
    "parse_dialogues",
    "read_jsonl",
    "roleplay_prompt",
    "write_jsonl",
]

QUESTIONS = {
    "appearance": "Describe the appearance of the character in this image: face, hair, eyes, build and expression.",
    "outfit": "Describe the clothes and accessories the character wears in this image.",
    "style": "In a few words, what is the art style of this image (photograph, anime, 3D render, painting...)?",
}
FIRST_USER_TURN = "Hello! Nice to meet you."


@dataclass(frozen=True, slots=True)
class Persona:
    """The text side of a character: what the submitter wrote."""

    name: str
    description: str
    greeting: str
    example_dialogues: str = ""


@dataclass(frozen=True, slots=True)
class Caption:
    """The model's own description of one image."""

    key: str
    appearance: str
    outfit: str
    style: str

    def short(self, name: str) -> str:
        """A one-line text-to-image prompt."""
        return f"{name}. {self.appearance.rstrip('.')}. Wearing {self.outfit.rstrip('.')}. Style: {self.style}"


@dataclass(frozen=True, slots=True)
class Annotation:
    """Training samples, held-out items and the captions they came from."""

    captions: tuple[Caption, ...]
    train: tuple[Sample, ...]
    heldout_images: tuple[str, ...]  # identity references never trained on
    heldout_qa: tuple[tuple[str, str], ...]  # (prompt, expected reply) pairs never trained on

    def data_hash(self) -> str:
        """A digest of exactly what was trained on (recorded in the adapter's metadata)."""
        digest = hashlib.sha256()
        for sample in self.train:
            digest.update(json.dumps(_sample_json(sample), sort_keys=True).encode())
        return digest.hexdigest()


def caption_images(
    model: CharacterModel, images: dict[str, Image.Image], *, seed: int = 0, max_new_tokens: int = 64,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Caption]:
    """Ask the model three questions about each image, greedily (deterministic)."""
    params = TextParams(max_new_tokens=max_new_tokens, temperature=0.0, seed=seed)
    captions = []
    for done, key in enumerate(sorted(images), start=1):
        answers = {
            field: _one_line(model.generate_text([ImageSegment(images[key]), TextSegment(question)], params))
            for field, question in QUESTIONS.items()
        }
        captions.append(Caption(key=key, **answers))
        if on_progress is not None:
            on_progress(done, len(images))
    return captions


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "unknown"


def roleplay_prompt(persona: Persona, history: Sequence[tuple[str, str]], user_text: str) -> str:
    """The paper's role-play prompt (MODEL.md 8.1): description, opening, history, user input, instruction."""
    lines = [f"Character Description: {persona.description}", "", f"Opening: {persona.greeting}", ""]
    if history:
        turns = "\n".join(f"{speaker}: {text}" for speaker, text in history)
        lines += [f"Conversation History:\n{turns}", ""]
    lines += [
        f"User Input: {user_text}",
        "",
        (
            "Based on the character description, opening, conversation history, current user input, and the "
            f"reference image, please generate {persona.name}'s response."
        ),
    ]
    return "\n".join(lines)


_TURN = re.compile(r"^\s*(\{\{user\}\}|\{\{char\}\}|user|you|[^:\n]{1,40}):\s*(.+)$", re.IGNORECASE)


def parse_dialogues(text: str, name: str) -> list[list[tuple[str, str]]]:
    """Example dialogues (card convention: ``<START>`` blocks of ``{{user}}:`` / ``{{char}}:`` lines) as
    conversations of ``("user" | "char", text)`` turns; lines of other shapes continue the previous turn."""
    conversations: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        if line.strip().upper() == "<START>":
            if current:
                conversations.append(current)
            current = []
            continue
        match = _TURN.match(line)
        if match:
            speaker = match.group(1).strip().lower()
            role = "char" if speaker in ("{{char}}", name.lower()) else "user"
            current.append((role, match.group(2).strip()))
        elif line.strip() and current:
            role, said = current[-1]
            current[-1] = (role, f"{said}\n{line.strip()}")
    if current:
        conversations.append(current)
    return [c for c in conversations if any(role == "char" for role, _ in c)]


def _dialogue_items(persona: Persona) -> list[tuple[str, str]]:
    """(prompt, reply) pairs: the greeting as the reply to a first hello, then every character turn."""
    items = [(roleplay_prompt(persona, [], FIRST_USER_TURN), persona.greeting)]
    for conversation in parse_dialogues(persona.example_dialogues, persona.name):
        history: list[tuple[str, str]] = []
        last_user = FIRST_USER_TURN
        for role, text in conversation:
            if role == "user":
                last_user = text
                continue
            items.append((roleplay_prompt(persona, history, last_user), text))
            history += [("User", last_user), (persona.name, text)]
    return items


def build_samples(
    persona: Persona, captions: Sequence[Caption], *, seed: int = 0, heldout_images: int = 2,
    heldout_fraction: float = 0.2,
) -> Annotation:
    """The SFT mixture (deterministic under ``seed``) and the held-out evaluation items."""
    rng = random.Random(seed)
    keys = sorted(c.key for c in captions)
    held = set(rng.sample(keys, min(heldout_images, max(len(keys) - 1, 0))))
    samples: list[Sample] = []
    for caption in captions:
        if caption.key in held:
            continue
        target = ImagePart(caption.key, target=True)
        samples.append(Sample((TextPart(caption.short(persona.name)), target), "t2i"))
        prompt = f"Character Description: {persona.description}\n\nPlease generate an image of {persona.name}: "
        samples.append(Sample((TextPart(prompt + caption.appearance), target), "t2i"))
        seen = ImagePart(caption.key, vit=True)
        for field, question in QUESTIONS.items():
            samples.append(Sample((seen, TextPart(question), TextPart(getattr(caption, field), loss=True)), "vlm"))
        samples.append(Sample((seen, TextPart("Who is this?"), TextPart(persona.name, loss=True)), "vlm"))
    dialogue = _dialogue_items(persona)
    rng.shuffle(dialogue)
    n_held = int(len(dialogue) * heldout_fraction) if len(dialogue) > 1 else 0
    heldout_qa, trained = dialogue[:n_held], dialogue[n_held:]
    for prompt, reply in trained:
        samples.append(Sample((TextPart(prompt), TextPart(reply, loss=True)), "vlm"))
    samples.append(
        Sample((TextPart(f"Who is {persona.name}?"), TextPart(persona.description, loss=True)), "vlm")
    )
    return Annotation(
        captions=tuple(captions), train=tuple(samples), heldout_images=tuple(sorted(held)),
        heldout_qa=tuple(heldout_qa),
    )


def annotate(
    model: CharacterModel, persona: Persona, images: dict[str, Image.Image], *, seed: int = 0,
    heldout_images: int = 2, max_new_tokens: int = 64, on_progress: Callable[[int, int], None] | None = None,
) -> Annotation:
    """Caption the images with the model, then build the mixture."""
    captions = caption_images(model, images, seed=seed, max_new_tokens=max_new_tokens, on_progress=on_progress)
    return build_samples(persona, captions, seed=seed, heldout_images=heldout_images)


def _sample_json(sample: Sample) -> dict:
    parts = [
        {"text": p.text, "loss": p.loss} if isinstance(p, TextPart)
        else {"image": p.key, "vit": p.vit, "vae": p.vae, "target": p.target}
        for p in sample.parts
    ]
    return {"group": sample.group, "segments": parts}


def _sample_from(raw: dict) -> Sample:
    parts = tuple(
        TextPart(p["text"], bool(p.get("loss"))) if "text" in p
        else ImagePart(p["image"], bool(p.get("vit")), bool(p.get("vae")), bool(p.get("target")))
        for p in raw["segments"]
    )
    return Sample(parts, raw.get("group", "vlm"))


def write_jsonl(annotation: Annotation, path: Path) -> Path:
    """One JSON object per line: captions, training samples, held-out items (for admin review and resumes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for c in annotation.captions:
            row = {"type": "caption", "image": c.key, "appearance": c.appearance, "outfit": c.outfit, "style": c.style}
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
        for s in annotation.train:
            out.write(json.dumps({"type": "sample", **_sample_json(s)}, ensure_ascii=False) + "\n")
        for key in annotation.heldout_images:
            out.write(json.dumps({"type": "heldout_image", "image": key}) + "\n")
        for prompt, reply in annotation.heldout_qa:
            out.write(json.dumps({"type": "heldout_qa", "prompt": prompt, "reply": reply}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_jsonl(path: Path) -> Annotation:
    """The annotation written by :func:`write_jsonl` (a resumed job does not caption again)."""
    captions, train, images, qa = [], [], [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        kind = row.pop("type")
        if kind == "caption":
            captions.append(Caption(key=row["image"], appearance=row["appearance"], outfit=row["outfit"],
                                    style=row["style"]))
        elif kind == "sample":
            train.append(_sample_from(row))
        elif kind == "heldout_image":
            images.append(row["image"])
        elif kind == "heldout_qa":
            qa.append((row["prompt"], row["reply"]))
    return Annotation(tuple(captions), tuple(train), tuple(images), tuple(qa))
