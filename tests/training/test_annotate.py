"""Annotation: the model's own captions, the recipe's mixture, deterministic, written for review."""

from __future__ import annotations

import io

from PIL import Image

from core.model.api import ImageSegment
from tests.doubles import EchoModel
from tests.training.builders import noise_png
from training.annotate import (
    Persona,
    annotate,
    parse_dialogues,
    read_jsonl,
    write_jsonl,
)
from training.packing import ImagePart, TextPart

PERSONA = Persona(
    name="Mika",
    description="A shy librarian who secretly writes adventure novels.",
    greeting="Oh! Hi. Looking for a book?",
    example_dialogues="<START>\n{{user}}: What do you write?\n{{char}}: Adventures... dragons, mostly.\n"
    "{{user}}: Can I read one?\n{{char}}: Maybe. If you promise not to laugh.",
)
IMAGES = {f"k{i}": Image.open(io.BytesIO(noise_png(i))) for i in range(10)}


def test_captions_come_from_the_model_and_the_mix_has_both_groups(tmp_path):
    model = EchoModel()
    annotation = annotate(model, PERSONA, IMAGES, seed=3)
    assert len(model.calls) == 30  # three questions per image, each with the image in context
    assert all(isinstance(context[0], ImageSegment) for _, context in model.calls)
    assert len(annotation.heldout_images) == 2 and len(annotation.captions) == 10
    trained_images = {p.key for s in annotation.train for p in s.parts if isinstance(p, ImagePart)}
    assert trained_images.isdisjoint(annotation.heldout_images)
    t2i = [s for s in annotation.train if s.group == "t2i"]
    assert len(t2i) == 16 and all(s.parts[-1].target for s in t2i)
    replies = [s.parts[-1].text for s in annotation.train if isinstance(s.parts[-1], TextPart) and s.parts[-1].loss]
    held_replies = [reply for _, reply in annotation.heldout_qa]
    assert PERSONA.greeting in replies + held_replies and "Adventures... dragons, mostly." in replies + held_replies
    # deterministic under the seed, and the JSONL round-trips
    again = annotate(EchoModel(), PERSONA, IMAGES, seed=3)
    assert again.data_hash() == annotation.data_hash()
    assert read_jsonl(write_jsonl(annotation, tmp_path / "a.jsonl")) == annotation


def test_parse_dialogues_keeps_turns():
    [conversation] = parse_dialogues(PERSONA.example_dialogues, "Mika")
    assert [role for role, _ in conversation] == ["user", "char", "user", "char"]
