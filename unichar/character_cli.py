"""``unichar character import|export|list``: characters from and to card files and RoleScape folders.

``import`` takes a Character Card (``.png`` with a ``ccv3``/``chara`` chunk, or ``.json``) or a RoleScape-20
character folder; it is checked whole before anything is stored, so a refused import leaves no trace.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from core.characters import (
    CharacterError,
    export_card,
    get_character,
    import_card,
    list_characters,
)
from core.config import Settings
from core.media import FileStore
from core.rolescape import import_rolescape, is_rolescape_folder
from unichar.stores import run_in_transaction

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

__all__ = ["add_subparsers"]

log = logging.getLogger(__name__)


def _import(args: argparse.Namespace, session: Session, settings: Settings, store: FileStore) -> str:
    path = Path(args.path)
    status = "draft" if args.draft else "published"
    if path.is_dir():
        if not is_rolescape_folder(path):
            raise CharacterError(f"{path} is neither a card file nor a RoleScape folder (no annotation.json)")
        character = import_rolescape(session, path, store, settings, name=args.name, status=status)
    elif path.is_file():
        size = path.stat().st_size
        if size > settings.max_upload_bytes:  # refused before reading a huge file into memory
            raise CharacterError(
                f"{path.name} is {size / 2**20:.1f} MB; the limit is {settings.max_upload_bytes / 2**20:.1f} MB"
            )
        character = import_card(session, path.read_bytes(), store, settings, name=args.name, status=status)
    else:
        raise CharacterError(f"{path} does not exist")
    images = len(character.reference_images)
    return f"imported {character.name} ({character.status}, {images} reference image{'s' * (images != 1)})"


def _export(args: argparse.Namespace, session: Session, settings: Settings, store: FileStore) -> str:
    character = get_character(session, args.name)
    if character is None:
        raise CharacterError(f"there is no character called {args.name!r}")
    data = export_card(character, store, args.format)
    out = Path(args.out or f"{character.name}.{args.format}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(data)
    return f"wrote {out} ({len(data):,} bytes)"


def _list(args: argparse.Namespace, session: Session, settings: Settings, store: FileStore) -> str:
    statuses = ("draft", "published", "retired") if args.all else ("published",)
    lines = [
        f"{c.name:<24} {c.status:<10} {len(c.reference_images):>2} images  "
        f"{'adapter v' + str(c.adapter_version) if c.adapter_key else 'no adapter'}"
        for c in list_characters(session, statuses)
    ]
    return "\n".join(lines) or "No characters yet: unichar character import FILE|DIR adds one."


_ACTIONS = {"import": _import, "export": _export, "list": _list}


def _run(args: argparse.Namespace, settings: Settings) -> int:
    """Do the one action in one transaction; a refusal rolls everything back and exits with code 2."""
    store = FileStore(settings.files_dir)
    action = _ACTIONS[args.character_action]
    return run_in_transaction(settings, lambda session: action(args, session, settings, store), (CharacterError,))


def add_subparsers(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``character import|export|list`` on the ``unichar`` command."""
    character = subparsers.add_parser("character", help="import, export and list characters")
    actions = character.add_subparsers(dest="character_action", required=True, metavar="ACTION")
    add = actions.add_parser("import", help="import a card (.png/.json) or a RoleScape-20 character folder")
    add.add_argument("path", metavar="FILE|DIR")
    add.add_argument("--name", help="store the character under this name instead of the card's")
    add.add_argument("--draft", action="store_true", help="import as a draft (not offered to users yet)")
    out = actions.add_parser("export", help="write a character as a Character Card V3 (or its original version)")
    out.add_argument("name")
    out.add_argument("--format", choices=("png", "json"), default="png")
    out.add_argument("--out", metavar="FILE", help="where to write it (default: NAME.png or NAME.json)")
    listing = actions.add_parser("list", help="the characters users can pick")
    listing.add_argument("--all", action="store_true", help="include drafts and retired characters")
    character.set_defaults(handler=_run)
