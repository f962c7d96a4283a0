"""Import of a RoleScape-20 character folder (MODEL.md 8.1) as a character.

``annotation.json`` gives the description, the opening (the greeting) and the image scenes; the scenes, followed by
the text-only ``*_dialogue_text_extension_train.json`` dialogues, become the example dialogues in the card
convention (``<START>`` blocks of ``{{user}}:`` / ``{{char}}:`` lines), which prompt assembly drops block by block
when the budget is tight. The numbered images (``0.png`` ...) become the reference images, captioned from
``*_t2i_instruction.json``. The folder is read and every image validated before anything is stored.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from core.characters import CharacterError, accept_image, add_reference_image, create_character
from core.db.models import Character

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from core.config import Settings
    from core.media import FileStore

__all__ = ["RoleScapeCharacter", "is_rolescape_folder", "read_rolescape", "import_rolescape"]

log = logging.getLogger(__name__)

MAX_IMAGES: Final = 10
MAX_DIALOGUES: Final = 30  # example dialogues kept; the prompt budget trims them further
_SPEAKER: Final = {"user": "{{user}}", "machine": "{{char}}"}


@dataclass(frozen=True, slots=True)
class RoleScapeCharacter:
    """What a RoleScape folder says about its character."""

    name: str
    description: str
    opening: str
    example_dialogues: str
    images: tuple[tuple[Path, str], ...]  # (file, caption), in id order


def is_rolescape_folder(path: Path) -> bool:
    """Whether ``path`` looks like one RoleScape character folder."""
    return path.is_dir() and (path / "annotation.json").is_file()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CharacterError(f"{path.name} cannot be read: {error}") from None


def _short_name(folder: Path) -> str:
    """The name the data set's own files use (``Ichihime_with_image.json``), else the folder's last part."""
    for suffix in ("_with_image.json", "_t2i_instruction.json"):
        for path in sorted(folder.glob("*" + suffix)):
            return path.name[: -len(suffix)]
    return folder.name.rsplit("-", 1)[-1].strip()


def _dialogue(scene: Any, where: str) -> str:
    if not isinstance(scene, list):
        raise CharacterError(f"{where} is not a list of turns")
    lines = ["<START>"]
    for turn in scene:
        if not isinstance(turn, dict) or not isinstance(turn.get("text"), str) or turn.get("role") not in _SPEAKER:
            raise CharacterError(f"{where} has a turn without role user/machine and text")
        lines.append(f"{_SPEAKER[turn['role']]}: {turn['text'].strip()}")
    return "\n".join(lines)


def _scenes(document: Any, where: str) -> list[Any]:
    scenes = document.get("scenes", []) if isinstance(document, dict) else None
    if not isinstance(scenes, list):
        raise CharacterError(f"{where} has no list of scenes")
    return scenes


def _captions(folder: Path, name: str) -> dict[str, str]:
    path = folder / f"{name}_t2i_instruction.json"
    if not path.is_file():
        return {}
    items = _read_json(path).get("t2i_instructions", [])
    return {str(item.get("image_id")): str(item.get("t2i_instruction", "")) for item in items if isinstance(item, dict)}


def read_rolescape(folder: Path) -> RoleScapeCharacter:
    """The character of a RoleScape folder; raises CharacterError saying what is wrong with it."""
    folder = Path(folder)
    if not is_rolescape_folder(folder):
        raise CharacterError(f"{folder} is not a RoleScape character folder (no annotation.json)")
    annotation = _read_json(folder / "annotation.json")
    if not isinstance(annotation, dict) or not isinstance(annotation.get("description"), str):
        raise CharacterError("annotation.json has no description")
    opening = annotation.get("opening") or ""
    if not isinstance(opening, str):
        raise CharacterError("annotation.json's opening is not text")
    name = _short_name(folder)
    scenes = _scenes(annotation, "annotation.json")
    extension = folder / f"{name}_dialogue_text_extension_train.json"
    if extension.is_file():
        scenes = scenes + _scenes(_read_json(extension), extension.name)
    dialogues = [_dialogue(scene, f"dialogue {i}") for i, scene in enumerate(scenes[:MAX_DIALOGUES])]
    numbered = sorted((p for p in folder.glob("*.png") if p.stem.isdigit()), key=lambda p: int(p.stem))
    if not numbered:
        raise CharacterError(f"{folder.name} has no reference images (0.png, 1.png, ...)")
    captions = _captions(folder, name)
    return RoleScapeCharacter(
        name=name,
        description=annotation["description"].strip(),
        opening=opening.strip(),
        example_dialogues="\n".join(dialogues),
        images=tuple((path, captions.get(path.stem, "")) for path in numbered[:MAX_IMAGES]),
    )


def import_rolescape(
    session: Session,
    folder: Path,
    store: FileStore,
    settings: Settings,
    *,
    name: str | None = None,
    status: str = "published",
) -> Character:
    """A character from a RoleScape folder with its reference images; refusals store nothing."""
    source = read_rolescape(folder)
    images = [(accept_image(path.read_bytes(), settings), caption) for path, caption in source.images]
    character = create_character(
        session,
        name or source.name,
        status=status,
        description=source.description,
        greeting=source.opening,
        example_dialogues=source.example_dialogues,
    )
    for image, caption in images:
        add_reference_image(session, character, image, store, caption)
    log.info("imported RoleScape character %s with %d images", character.name, len(images))
    return character
