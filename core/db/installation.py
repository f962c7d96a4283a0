"""The token that names a database (``core.db.models.Installation``), read once when a process starts.

Every Redis key that depends on row ids carries it: the job event streams (``core.streams``) and the broker's
queues (``workers.celery_app.use_installation``). Job ids start again at 1 in a database made again, and two
installations may share one Redis database; with the token, neither reads the other's streams nor takes the other's
job messages.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from core.db.models import Installation

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

__all__ = ["SchemaNotReady", "installation_token"]


class SchemaNotReady(RuntimeError):
    """The database has no token: its schema was never created, or predates migration 0002."""

    def __init__(self) -> None:
        super().__init__("the SQL store has no installation row: run `unichar db upgrade`")


def installation_token(sessions: sessionmaker[Session]) -> str:
    """The database's token; SchemaNotReady when there is none."""
    try:
        with sessions() as session:
            token = session.scalar(select(Installation.token))
    except DBAPIError as error:  # no such table
        raise SchemaNotReady() from error
    if token is None:
        raise SchemaNotReady()
    return token
