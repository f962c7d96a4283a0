"""``unichar memory export|forget``: a user's data on request (export as JSON; forget-me that really deletes).

For the operator answering a data request; users reach the same functions through ``/memory`` and ``/forget me``.
A user is named by platform identity (``telegram:123``), as in ``UNICHAR_ADMIN_IDS``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sqlalchemy import select

from core.config import Settings
from core.db.migrate import upgrade
from core.db.models import User
from core.db.session import make_engine, make_sessionmaker
from core.media import FileStore
from core.memory import export_user, forget_user

__all__ = ["add_subparsers"]


def _user_id(session, identity: str) -> int:  # type: ignore[no-untyped-def]
    platform, _, platform_user_id = identity.partition(":")
    user = session.scalar(select(User).where(User.platform == platform, User.platform_user_id == platform_user_id))
    if not platform or not platform_user_id or user is None:
        raise LookupError(f"no user {identity!r} (give it as platform:user_id, e.g. telegram:123)")
    return user.id


def _run(args: argparse.Namespace, settings: Settings) -> int:
    """Export or delete in one transaction; an unknown user changes nothing and exits with code 2."""
    upgrade(settings.sql_url)
    db = make_sessionmaker(make_engine(settings.sql_url))
    try:
        with db.begin() as session:
            user_id = _user_id(session, args.user)
            if args.memory_action == "export":
                text = json.dumps(export_user(session, user_id), ensure_ascii=False, indent=2)
                if args.out:
                    Path(args.out).write_text(text + "\n", encoding="utf-8")
                    print(f"wrote {args.out}")
                else:
                    print(text)
            else:
                deleted = forget_user(session, user_id, FileStore(settings.files_dir))
                print("deleted " + ", ".join(f"{n} {table}" for table, n in sorted(deleted.items()) if n))
    except LookupError as error:
        print(f"unichar: {error}", file=sys.stderr)
        return 2
    return 0


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
