"""Intake rules of a character's source images and persona, all-or-nothing (issue 7, MODEL.md 8.1).

The rules live in ``core.submissions`` (the bots call them one image at a time): a real PNG, JPEG or WebP (no GIF,
BMP, TIFF or PDF, whatever the file's name says) decoded by ``core.media.validate_image`` (EXIF orientation applied,
metadata stripped, size and pixel limits, decompression bombs refused), no near-duplicates by perceptual hash, the
configured number of images, the consent attestation.
This module applies the same rules to a whole set at once, so that a folder (a RoleScape character, an operator's
upload) is checked completely before anything is stored: one bad image and nothing changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from core.media import TRAINING_FORMATS, MediaError, ValidatedImage, validate_image
from core.rolescape import read_rolescape
from core.submissions import (
    CONSENT_TEXT,
    Actor,
    SubmissionError,
    Submissions,
    hash_distance,
    perceptual_hash,
)

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from core.config import Settings
    from core.db.models import CharacterSubmission

__all__ = ["check_images", "submit_images", "submit_rolescape"]


def check_images(datas: Sequence[bytes], settings: Settings) -> list[ValidatedImage]:
    """Validate a whole set: count bounds, each image, and duplicates among them; raises naming the image."""
    low, high = settings.submission_min_images, settings.submission_max_images
    if not low <= len(datas) <= high:
        wanted = f"{low}" if low == high else f"{low} to {high}"
        raise SubmissionError(f"A character needs {wanted} images; {len(datas)} were given.")
    checked: list[ValidatedImage] = []
    hashes: list[str] = []
    for number, data in enumerate(datas, start=1):
        try:
            image = validate_image(data, settings, TRAINING_FORMATS)
        except MediaError as error:
            raise SubmissionError(f"Image {number}: {error}") from error
        digest = perceptual_hash(image.open())
        for other, seen in enumerate(hashes, start=1):
            if hash_distance(digest, seen) <= settings.submission_dup_distance:
                raise SubmissionError(f"Image {number} is a near-duplicate of image {other}.")
        checked.append(image)
        hashes.append(digest)
    return checked


def submit_images(
    session: Session,
    service: Submissions,
    who: Actor,
    *,
    name: str,
    description: str,
    greeting: str,
    images: Sequence[bytes],
    example_dialogues: str = "",
    real_person: bool = False,
    consent_text: str = CONSENT_TEXT,
    chat_id: str = "",
) -> CharacterSubmission:
    """Check everything first, then run the /newcharacter steps and submit, in the caller's one transaction."""
    check_images(images, service.settings)
    if service.draft(session, who) is not None:
        raise SubmissionError("You already have a character in progress; finish or cancel it first.")
    service.start(session, who, chat_id)
    service.set_name(session, who, name)
    service.set_description(session, who, description)
    service.set_greeting(session, who, greeting)
    if example_dialogues:
        service.set_example_dialogues(session, who, example_dialogues)
    for data in images:
        service.add_image(session, who, data)
    service.attest_consent(session, who, real_person=real_person, text=consent_text)
    return service.submit(session, who)


def submit_rolescape(
    session: Session, service: Submissions, who: Actor, folder: Path, *, consent_text: str = CONSENT_TEXT
) -> CharacterSubmission:
    """Submit a RoleScape-20 character folder (MODEL.md 8.1) as a /newcharacter submission."""
    character = read_rolescape(folder)
    return submit_images(
        session, service, who,
        name=character.name,
        description=character.description,
        greeting=character.opening,
        example_dialogues=character.example_dialogues,
        images=[path.read_bytes() for path, _caption in character.images],
        real_person=False,
        consent_text=consent_text,
    )
