"""Builders of rows, messages and image bytes for tests of the job path."""

from __future__ import annotations

import io
import itertools

from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from core.db.models import Character
from core.jobs import Attachment, IncomingMessage

__all__ = ["add_character", "incoming", "image_bytes"]

_message_ids = itertools.count(1)


def add_character(factory: sessionmaker[Session], name: str = "Furina", **fields: object) -> int:
    """A published character; returns its id."""
    values: dict[str, object] = {"description": f"{name} is a test character.", "greeting": f"Hello, I am {name}."}
    with factory.begin() as session:
        character = Character(name=name, **(values | fields))
        session.add(character)
        session.flush()
        return character.id


def incoming(
    text: str,
    user: str = "u1",
    chat: str = "c1",
    attachments: tuple[Attachment, ...] = (),
    platform: str = "console",
    is_group: bool = False,
) -> IncomingMessage:
    """A platform-neutral message from ``user`` in ``chat``."""
    return IncomingMessage(
        platform=platform,
        user_id=user,
        chat_id=chat,
        message_id=str(next(_message_ids)),
        text=text,
        attachments=attachments,
        display_name=f"User {user}",
        is_group=is_group,
    )


def image_bytes(fmt: str = "PNG", size: tuple[int, int] = (32, 24), **save: object) -> bytes:
    """A small real image encoded as ``fmt``."""
    image = Image.new("RGB", size, (200, 30, 60))
    for x in range(size[0]):
        image.putpixel((x, x % size[1]), (0, 255, 0))
    out = io.BytesIO()
    image.save(out, format=fmt, **save)
    return out.getvalue()
