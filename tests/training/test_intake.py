"""Intake of a whole image set is all-or-nothing: one bad image and nothing is stored."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from core.db.models import CharacterSubmission
from core.submissions import Actor, State, SubmissionError
from tests.training.builders import noise_png
from training.annotate import parse_dialogues
from training.intake import check_images, submit_images, submit_rolescape

USER = Actor("test", "fan")
TEXTS = {"name": "Mika", "description": "A shy librarian who secretly writes adventure novels.", "greeting": "Oh! Hi."}


@pytest.mark.parametrize(
    ("images", "reason"),
    [
        ([noise_png(i) for i in range(9)], "needs 10 images; 9 were given"),
        ([noise_png(i) for i in range(9)] + [b"%PDF-1.4 fake"], "Image 10: This file is not an image"),
        ([noise_png(i) for i in range(9)] + [noise_png(0)], "Image 10 is a near-duplicate of image 1"),
    ],
)
def test_bad_sets_store_nothing(stack, images, reason):
    settings, db, store, service = stack
    with pytest.raises(SubmissionError, match=reason), db.begin() as s:
        submit_images(s, service, USER, images=images, **TEXTS)
    with db() as s:
        assert s.scalars(select(CharacterSubmission)).all() == []
    assert not settings.files_dir.exists() or not any(p.is_file() for p in settings.files_dir.rglob("*"))


def test_check_images_normalises(stack):
    settings, *_ = stack
    checked = check_images([noise_png(i) for i in range(10)], settings)
    assert len(checked) == 10 and all(c.format == "png" for c in checked)


def test_rolescape_character_submitted_with_consent(stack, ichihime):
    settings, db, store, service = stack
    with db.begin() as s:
        submission = submit_rolescape(s, service, USER, ichihime)
        assert submission.state == State.PENDING and len(submission.images) == 10
        assert submission.consent_attested and submission.consent_text
        assert parse_dialogues(submission.example_dialogues, submission.name)
