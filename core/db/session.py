"""Engine and session factory: one engine per process, one short transaction per unit of work.

Services take a ``Session`` argument; callers frame the transaction (``with db.begin() as session:``).
SQLite gets WAL mode, a busy timeout, enforced foreign keys, working savepoints and transactions that take the
write lock when they begin, so that it behaves like the server databases under the few concurrent writers a single
machine has. The threads of one process queue for that lock on a lock of the process (woken as soon as it is free),
and only the one at the head of the queue asks SQLite, polling every few milliseconds at most, instead of every
thread waiting in SQLite's busy handler, which sleeps up to 100 ms between tries.

Two lighter units of work for the job path: ``reading(sessionmaker)``, a session that only reads (on SQLite a
DEFERRED transaction, a WAL snapshot that neither waits for the write lock nor holds it; on PostgreSQL statements
without the BEGIN and COMMIT round trips), and ``single_statements(sessionmaker)``, a connection for statements
that are each atomic on their own (on PostgreSQL without BEGIN and COMMIT; on SQLite a write transaction).
"""

from __future__ import annotations

import sqlite3
import threading
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Final

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

__all__ = ["make_engine", "make_sessionmaker", "reading", "single_statements"]

_READ_ONLY: Final = "unichar_read_only"  # execution option of a SQLite connection that only reads
_AUTOCOMMIT: Final = {"isolation_level": "AUTOCOMMIT"}

_BUSY_TIMEOUT_S = 30
_POLL_S = (0.0002, 0.005)  # first and longest pause between tries for another process's write lock


def _writer_lock_factory() -> type[sqlite3.Connection]:
    """A connection class whose transactions hold one lock shared by the engine's connections, begin to end."""
    lock = threading.Lock()

    class _Connection(sqlite3.Connection):
        holding = False

        def begin_immediate(self) -> None:
            if not lock.acquire(timeout=_BUSY_TIMEOUT_S):
                raise sqlite3.OperationalError("database is locked (by another thread of this process)")
            self.holding = True
            try:
                self._begin_polling(time.monotonic() + _BUSY_TIMEOUT_S)
            except BaseException:
                self._release()
                raise

        def _begin_polling(self, deadline: float) -> None:
            """BEGIN IMMEDIATE, retried in short pauses while another process writes (busy handler off meanwhile)."""
            pause = _POLL_S[0]
            self.execute("PRAGMA busy_timeout=0")
            try:
                while True:
                    try:
                        self.execute("BEGIN IMMEDIATE")
                        return
                    except sqlite3.OperationalError as error:
                        if "locked" not in str(error) or time.monotonic() + pause > deadline:
                            raise
                    time.sleep(pause)
                    pause = min(pause * 2, _POLL_S[1])
            finally:
                self.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_S * 1000}")

        def _release(self) -> None:
            if self.holding:
                self.holding = False
                lock.release()

        def commit(self) -> None:
            try:
                super().commit()
            finally:
                if not self.in_transaction:
                    self._release()

        def rollback(self) -> None:
            try:
                super().rollback()
            finally:
                self._release()

        def close(self) -> None:
            try:
                super().close()
            finally:
                self._release()

    return _Connection


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    # pysqlite's own BEGIN handling breaks SAVEPOINT and lets a read transaction fail when it later writes;
    # the driver stays in autocommit and _sqlite_begin starts every transaction itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(connection) -> None:  # type: ignore[no-untyped-def]
    # IMMEDIATE takes the write lock up front: concurrent writers wait (busy_timeout) instead of failing
    if connection.get_execution_options().get(_READ_ONLY):
        connection.connection.dbapi_connection.execute("BEGIN")
    else:
        connection.connection.dbapi_connection.begin_immediate()


def make_engine(url: str) -> Engine:
    """An engine for ``url``; creates the SQLite file's folder when needed."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"check_same_thread": False, "timeout": _BUSY_TIMEOUT_S, "factory": _writer_lock_factory()}
        engine = create_engine(url, connect_args=connect_args)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    # no pool_pre_ping: a round trip per checkout; a connection found dead fails its statement and SQLAlchemy then
    # replaces every pooled connection (a job that fails so is retried, a frontend shows a clear error)
    return create_engine(url, pool_size=10, max_overflow=20)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    """The session factory bound to ``engine``; objects stay usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def _engine(factory: sessionmaker[Session]) -> Engine:
    return factory.kw["bind"]  # type: ignore[no-any-return]


def reading(factory: sessionmaker[Session]) -> Session:
    """A session of ``factory`` for reads only: never write in it (on PostgreSQL each statement stands alone)."""
    sqlite = _engine(factory).dialect.name == "sqlite"
    return factory(execution_options={_READ_ONLY: True} if sqlite else _AUTOCOMMIT)


def single_statements(factory: sessionmaker[Session]) -> AbstractContextManager[Connection]:
    """A connection of ``factory``'s engine for statements each atomic on its own, such as one conditional UPDATE."""
    engine = _engine(factory)
    if engine.dialect.name == "sqlite":  # the driver stays in autocommit; transactions are what take the write lock
        return engine.begin()
    return engine.connect().execution_options(**_AUTOCOMMIT)
