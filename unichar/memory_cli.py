"""``unichar memory export|forget``: a user's data on request (export as JSON; forget-me that really deletes).

For the operator answering a data request; users reach the same functions through ``/memory`` and ``/forget me``.
A user is named by platform identity (``telegram:123``), as in ``UNICHAR_ADMIN_IDS``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from core.db.models import User
from core.media import FileStore
from core.memory import export_user, forget_user
from unichar.stores import run_in_transaction

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from core.config import Settings

__all__ = ["add_subparsers"]


def _user_id(session: Session, identity: str) -> int:
    platform, _, platform_user_id = identity.partition(":")
    user = session.scalar(select(User).where(User.platform == platform, User.platform_user_id == platform_user_id))
    if not platform or not platform_user_id or user is None:
        raise LookupError(f"no user {identity!r} (give it as platform:user_id, e.g. telegram:123)")
    return user.id


def _export(args: argparse.Namespace, session: Session, _settings: Settings) -> str:
    text = json.dumps(export_user(session, _user_id(session, args.user)), ensure_ascii=False, indent=2)
    if not args.out:
        return text
    Path(args.out).write_text(text + "\n", encoding="utf-8")
    return f"wrote {args.out}"


def _forget(args: argparse.Namespace, session: Session, settings: Settings) -> str:
    deleted = forget_user(session, _user_id(session, args.user), FileStore(settings.files_dir))
    return "deleted " + ", ".join(f"{n} {table}" for table, n in sorted(deleted.items()) if n)


_ACTIONS = {"export": _export, "forget": _forget}


def _run(args: argparse.Namespace, settings: Settings) -> int:
    """Export or delete in one transaction; an unknown user changes nothing and exits with code 2."""
    action = _ACTIONS[args.memory_action]
    return run_in_transaction(settings, lambda session: action(args, session, settings), (LookupError,))


def add_subparsers(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``memory export|forget`` on the ``unichar`` command."""
    memory = subparsers.add_parser("memory", help="export or delete everything stored of one user")
    actions = memory.add_subparsers(dest="memory_action", required=True, metavar="ACTION")
    export = actions.add_parser("export", help="print (or write) the user's persona, conversations and memories")
    export.add_argument("user", metavar="PLATFORM:USER_ID")
    export.add_argument("--out", metavar="FILE", help="write the JSON here instead of printing it")
    forget = actions.add_parser("forget", help="delete every row and file of the user (cannot be undone)")
    forget.add_argument("user", metavar="PLATFORM:USER_ID")
    memory.set_defaults(handler=_run)
