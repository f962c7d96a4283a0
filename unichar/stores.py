"""What the store-editing sub-commands share: the schema brought up to date, one transaction, refusals as exit 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from core.db.migrate import upgrade
from core.db.session import make_engine, make_sessionmaker

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from core.config import Settings

__all__ = ["run_in_transaction"]


def run_in_transaction(
    settings: Settings, action: Callable[[Session], str], refusals: tuple[type[Exception], ...]
) -> int:
    """Print what ``action`` returns; a refusal rolls the transaction back, is printed, and exits with code 2."""
    upgrade(settings.sql_url)  # a fresh machine may run this command before anything else
    db = make_sessionmaker(make_engine(settings.sql_url))
    try:
        with db.begin() as session:
            print(action(session))
    except refusals as error:
        print(f"unichar: {error}", file=sys.stderr)
        return 2
    return 0
