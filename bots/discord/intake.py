"""Attachments a Discord user sent, checked before anything is stored: type, size, then a real decode.

The declared size is checked before downloading, so an oversized file costs nothing; the bytes are then decoded
and normalised by :func:`core.media.validate_image`, in the formats the caller takes (a chat picture may be a
GIF, a /newcharacter picture may not). Each refused file gets one line saying why, so the user learns what was
wrong while the accepted images still go through.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import discord

from core.jobs import Attachment
from core.media import ACCEPTED_FORMATS, MediaError, format_names, validate_image

if TYPE_CHECKING:
    from collections.abc import Sequence

    from core.config import Settings

__all__ = ["Intake", "read_images"]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Intake:
    """The images accepted from a message, and one reason per refused file."""

    images: list[Attachment] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    @property
    def notice(self) -> str:
        """The refusals as one message to show the user (empty when every file was fine)."""
        return "\n".join(f"⚠️ {line}" for line in self.refused)


def _megabytes(size: int) -> str:
    return f"{size / (1024 * 1024):.0f} MB"


async def _read_one(attachment: discord.Attachment, settings: Settings, formats: Sequence[str]) -> Attachment:
    """One attachment downloaded and validated; raises MediaError with the reason to show."""
    name = attachment.filename
    declared = attachment.content_type or ""
    if declared and not declared.startswith("image/"):
        raise MediaError(f"{name} is not an image; I can only look at {format_names(formats)} pictures.")
    if attachment.size > settings.max_upload_bytes:
        raise MediaError(f"{name} is too large: the limit is {_megabytes(settings.max_upload_bytes)}.")
    try:
        data = await attachment.read()
    except discord.HTTPException as exc:  # expired or deleted on Discord's CDN
        log.info("could not download attachment %s: %s", attachment.id, exc.status)
        raise MediaError(f"I could not download {name}; please send it again.") from None
    try:
        image = validate_image(data, settings, formats)
    except MediaError as exc:
        raise MediaError(f"{name}: {exc}") from None
    return Attachment(filename=name, content_type=image.content_type, data=image.data)


async def read_images(
    attachments: Sequence[discord.Attachment], settings: Settings, formats: Sequence[str] = ACCEPTED_FORMATS
) -> Intake:
    """Download and validate every attachment; refusals are collected, never raised."""
    intake = Intake()
    for attachment in attachments:
        try:
            intake.images.append(await _read_one(attachment, settings, formats))
        except MediaError as exc:
            intake.refused.append(str(exc))
    return intake
