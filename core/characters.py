"""Characters: create, edit, list, publish and retire them; reference images; card import and export.

A character's card fields live in columns (what the prompt and the bots read) and the imported card document in
``Character.card``, verbatim: export writes the columns back over that document, so unknown keys and
``extensions`` survive the round trip. Card fields map to columns as ``first_mes`` -> ``greeting``,
``mes_example`` -> ``example_dialogues`` and ``personality`` -> ``style_notes``. Every import is checked whole
(card, image, name) before anything is written, so a refused card stores nothing.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

from PIL import Image
from sqlalchemy import func, select

from core.cards import Card, CardError, card_json, card_png, load_card, new_card
from core.db.models import Character, ReferenceImage
from core.media import FileStore, MediaError, ValidatedImage, validate_image

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from core.config import Settings

__all__ = [
    "CharacterError",
    "STATUSES",
    "get_character",
    "list_characters",
    "create_character",
    "edit_character",
    "publish_character",
    "retire_character",
    "accept_image",
    "add_reference_image",
    "greetings",
    "card_of",
    "import_card",
    "export_card",
]

log = logging.getLogger(__name__)

STATUSES: Final = ("draft", "published", "retired")
IMAGE_POLICIES: Final = ("never", "on_request", "auto")
_TEXT_COLUMNS: Final = ("description", "greeting", "example_dialogues", "scenario", "style_notes")
_EDITABLE: Final = frozenset({"name", *_TEXT_COLUMNS, "alternate_greetings", "nsfw", "image_policy", "real_person"})
# column -> card field, for the fields a character edits (the rest of the card stays as imported)
_CARD_FIELDS: Final = {
    "name": "name",
    "description": "description",
    "greeting": "first_mes",
    "alternate_greetings": "alternate_greetings",
    "example_dialogues": "mes_example",
    "scenario": "scenario",
    "style_notes": "personality",
}


class CharacterError(ValueError):
    """A character operation refused; the message says why, fit to show the user."""


def get_character(session: Session, name: str) -> Character | None:
    """The character called ``name`` in any status, ignoring case and surrounding spaces."""
    query = select(Character).where(func.lower(Character.name) == name.strip().lower())
    return session.scalars(query).first()


def list_characters(session: Session, statuses: Sequence[str] = ("published",)) -> list[Character]:
    """Characters in the given statuses, by name."""
    query = select(Character).where(Character.status.in_(list(statuses))).order_by(func.lower(Character.name))
    return list(session.scalars(query))


def _check_fields(fields: Mapping[str, Any]) -> None:
    unknown = set(fields) - _EDITABLE
    if unknown:
        raise CharacterError(f"unknown character fields: {', '.join(sorted(unknown))}")
    for key in _TEXT_COLUMNS:
        if key in fields and not isinstance(fields[key], str):
            raise CharacterError(f"{key} must be text")
    greetings_ = fields.get("alternate_greetings", [])
    if not isinstance(greetings_, list) or not all(isinstance(g, str) for g in greetings_):
        raise CharacterError("alternate_greetings must be a list of texts")
    if fields.get("image_policy", "never") not in IMAGE_POLICIES:
        raise CharacterError(f"image_policy must be one of {', '.join(IMAGE_POLICIES)}")
    for key in ("nsfw", "real_person"):
        if key in fields and not isinstance(fields[key], bool):
            raise CharacterError(f"{key} must be true or false")


def _check_name(session: Session, name: Any, current: Character | None = None) -> str:
    if not isinstance(name, str) or not name.strip():
        raise CharacterError("a character needs a name")
    name = name.strip()
    if len(name) > 64 or "\n" in name:
        raise CharacterError("a character's name is one line of at most 64 characters")
    other = get_character(session, name)
    if other is not None and other is not current:
        raise CharacterError(f"a character called {other.name!r} already exists")
    return name


def create_character(
    session: Session,
    name: str,
    *,
    status: str = "draft",
    creator_id: int | None = None,
    card: Mapping[str, Any] | None = None,
    **fields: Any,
) -> Character:
    """A new character (a draft unless ``status`` says otherwise); ``fields`` are editable columns."""
    _check_fields(fields)
    if status not in STATUSES:
        raise CharacterError(f"status must be one of {', '.join(STATUSES)}")
    character = Character(
        name=_check_name(session, name), status=status, creator_id=creator_id, card=dict(card or {}), **fields
    )
    session.add(character)
    session.flush()
    log.info("created character %s (%s)", character.name, status)
    return character


def edit_character(session: Session, character: Character, **fields: Any) -> Character:
    """Change editable columns of ``character``; refuses unknown fields and bad values."""
    _check_fields(fields)
    if "name" in fields:
        fields["name"] = _check_name(session, fields["name"], character)
    for key, value in fields.items():
        setattr(character, key, value)
    session.flush()
    return character


def _has_persona(description: str, style_notes: str) -> bool:
    return bool(description.strip() or style_notes.strip())


def publish_character(session: Session, character: Character) -> Character:
    """Make the character selectable by users; it needs a persona (description or personality) first."""
    if not _has_persona(character.description, character.style_notes):
        raise CharacterError(f"{character.name} has no description yet")
    character.status = "published"
    session.flush()
    return character


def retire_character(session: Session, character: Character) -> Character:
    """Hide the character from users; conversations and memories stay until deleted."""
    character.status = "retired"
    session.flush()
    return character


def accept_image(data: bytes, settings: Settings) -> ValidatedImage:
    """The image validated for storage, or CharacterError saying why not."""
    try:
        return validate_image(data, settings)
    except MediaError as error:
        raise CharacterError(f"image refused: {error}") from None


def add_reference_image(
    session: Session, character: Character, image: ValidatedImage, store: FileStore, caption: str = ""
) -> ReferenceImage:
    """Store a validated image as the character's next reference image; the first one becomes the avatar."""
    key = store.put(image.data, image.suffix)
    row = ReferenceImage(
        file_key=key, position=len(character.reference_images), width=image.width, height=image.height, caption=caption
    )
    character.reference_images.append(row)
    if character.avatar_key is None:
        character.avatar_key = key
    session.flush()
    return row


def greetings(character: Character) -> list[str]:
    """The opening messages a new conversation can show, first the greeting, then the alternates (swipes)."""
    return [text for text in (character.greeting, *character.alternate_greetings) if text.strip()]


def card_of(character: Character) -> Card:
    """The character as a card: the imported document with the current columns written over it (V3 if none)."""
    columns = {field: getattr(character, column) for column, field in _CARD_FIELDS.items()}
    if not character.card:
        return new_card(columns)
    raw = {**character.card, "data": dict(character.card["data"])}
    for field, value in columns.items():
        if field in raw["data"] or value:  # absent stays absent: the round trip is exact
            raw["data"][field] = value
    return Card(raw)


def _columns_of(card: Card) -> dict[str, Any]:
    return {
        column: (card.strings(field) if column == "alternate_greetings" else card.text(field))
        for column, field in _CARD_FIELDS.items()
    }


def import_card(
    session: Session,
    data: bytes,
    store: FileStore,
    settings: Settings,
    *,
    name: str | None = None,
    status: str = "published",
    creator_id: int | None = None,
) -> Character:
    """A character from a card file's bytes (PNG or JSON); ``name`` renames it. Refusals store nothing."""
    try:
        loaded = load_card(data, max_bytes=settings.max_upload_bytes)
    except CardError as error:
        raise CharacterError(f"card refused: {error}") from None
    image = accept_image(loaded.image, settings) if loaded.image is not None else None
    columns = _columns_of(loaded.card)
    if name is not None:
        columns["name"] = name
    if status == "published" and not _has_persona(columns["description"], columns["style_notes"]):
        raise CharacterError("card refused: it has no description, so the character would have no persona")
    character = create_character(
        session,
        columns.pop("name"),
        status=status,
        creator_id=creator_id,
        card=loaded.card.raw,
        **columns,
    )
    if image is not None:
        add_reference_image(session, character, image, store, caption="card image")
    return character


def _as_png(data: bytes) -> bytes:
    """Stored image bytes as PNG (stored images are PNG or JPEG)."""
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "PNG":
            return data
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()


def export_card(character: Character, store: FileStore, fmt: str = "png") -> bytes:
    """The character as a card file: ``png`` (its avatar carrying the card) or ``json``."""
    card = card_of(character)
    if fmt == "json":
        return card_json(card)
    if fmt != "png":
        raise CharacterError(f"unknown card format {fmt!r}: use png or json")
    key = character.avatar_key or next((r.file_key for r in character.reference_images), None)
    if key is None:
        raise CharacterError(f"{character.name} has no image to carry a PNG card; export it as json")
    return card_png(card, _as_png(store.read(key)))
