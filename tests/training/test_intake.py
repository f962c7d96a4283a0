"""Intake of a whole image set is all-or-nothing: one bad image and nothing is stored.

A character's pictures are PNG, JPEG or WebP (issue 7): a GIF, BMP, TIFF or PDF is refused with a reason that names
the formats taken, whether the set comes at once (``submit_images``) or one picture at a time (the bots).
"""

from __future__ import annotations

import io

import pytest
from PIL import Image
from sqlalchemy import select

from core.db.models import CharacterSubmission
from core.submissions import Actor, State, SubmissionError
from tests.training.builders import noise_png
from training.annotate import parse_dialogues
from training.intake import check_images, submit_images, submit_rolescape

USER = Actor("test", "fan")
TEXTS = {"name": "Mika", "description": "A shy librarian who secretly writes adventure novels.", "greeting": "Oh! Hi."}
TAKEN = "send a PNG, JPEG or WebP."
UNREADABLE = f"This file is not an image I can read: {TAKEN}"


def noise_image(seed: int, fmt: str) -> bytes:
    """``noise_png(seed)`` saved as ``fmt`` (a real, decodable file of that format)."""
    out = io.BytesIO()
    Image.open(io.BytesIO(noise_png(seed))).convert("RGB").save(out, format=fmt)
    return out.getvalue()


def ten_with(data: bytes, at: int) -> list[bytes]:
    """Ten distinct PNGs with ``data`` in place of image ``at`` (counted from 1)."""
    images = [noise_png(i) for i in range(10)]
    images[at - 1] = data
    return images


@pytest.mark.parametrize(
    ("images", "reason"),
    [
        ([noise_png(i) for i in range(9)], "needs 10 images; 9 were given"),
        (ten_with(b"%PDF-1.4 fake", 10), f"Image 10: {UNREADABLE}"),
        (ten_with(noise_image(9, "GIF"), 10), f"Image 10: A GIF image can't be used here: {TAKEN}"),
        (ten_with(noise_image(0, "BMP"), 1), f"Image 1: {UNREADABLE}"),
        (ten_with(noise_image(0, "TIFF"), 1), f"Image 1: {UNREADABLE}"),
        (ten_with(noise_png(0), 10), "Image 10 is a near-duplicate of image 1"),
    ],
)
def test_bad_sets_store_nothing(stack, images, reason):
    settings, db, _store, service = stack
    with pytest.raises(SubmissionError, match=reason), db.begin() as s:
        submit_images(s, service, USER, images=images, **TEXTS)
    with db() as s:
        assert s.scalars(select(CharacterSubmission)).all() == []
    assert not settings.files_dir.exists() or not any(p.is_file() for p in settings.files_dir.rglob("*"))


def test_check_images_normalises(stack):
    settings, *_ = stack
    checked = check_images([noise_png(i) for i in range(10)], settings)
    assert len(checked) == 10 and all(c.format == "png" for c in checked)


def test_png_jpeg_and_webp_are_taken(stack):
    settings, *_ = stack
    images = [noise_image(0, "JPEG"), noise_image(1, "WEBP")] + [noise_png(i) for i in range(2, 10)]
    assert [c.format for c in check_images(images, settings)][:3] == ["jpeg", "png", "png"]


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_a_picture_sent_alone_in_another_format_is_refused_and_nothing_is_kept(stack, fmt):
    """The bots' path (/newcharacter on Telegram and Discord): one picture at a time through the submission."""
    settings, db, _store, service = stack
    with db.begin() as s:
        service.start(s, USER)
        service.set_name(s, USER, TEXTS["name"])
        assert service.add_image(s, USER, noise_png(1)) == 1
    with pytest.raises(SubmissionError, match=TAKEN), db.begin() as s:
        service.add_image(s, USER, noise_image(2, fmt))
    with db() as s:
        assert len(service.draft(s, USER).images) == 1  # the earlier picture stays, the refused one is not added
    assert len([p for p in settings.files_dir.rglob("*") if p.is_file()]) == 1  # and its bytes were not stored


def test_rolescape_character_submitted_with_consent(stack, ichihime):
    _settings, db, _store, service = stack
    with db.begin() as s:
        submission = submit_rolescape(s, service, USER, ichihime)
        assert submission.state == State.PENDING and len(submission.images) == 10
        assert submission.consent_attested and submission.consent_text
        assert parse_dialogues(submission.example_dialogues, submission.name)
