"""The job path's statements run straight on the database driver, inside the caller's transaction.

A message and its reply run about a dozen small statements. Through SQLAlchemy's execution layer each costs
50-150 us of Python (execution context, parameter construction, result wrapping; more through a Session): several
times what SQLite or PostgreSQL spend running it, and most of a worker's CPU per message. :class:`Prepared` keeps
the statement a SQLAlchemy Core construct (one definition for every dialect, rendered by SQLAlchemy) but compiles
it once per dialect and parameter shape, converts values with the column types' own bind and result processors
(and fills Python-side column defaults, as SQLAlchemy's execution would), and executes it on the transaction's
DBAPI connection: the same SQL, types and transaction for a fraction of the cost. The statement's own constants
are written into its SQL and only the caller's values are bound (see ``_constants_inline``).

Expanding ``IN`` parameters (``bindparam(..., expanding=True)``) get one compiled form per list length. Rows come
back as named tuples (``row.id``, or unpacked), their values as SQLAlchemy would return them.
"""

from __future__ import annotations

import functools
import threading
from collections import namedtuple
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Dialect
from sqlalchemy.orm import Session
from sqlalchemy.sql import ClauseElement, visitors
from sqlalchemy.sql.elements import BindParameter

__all__ = ["Prepared"]

Processor = Callable[[Any], Any]


class _Marker:
    """Stands for one parameter value while a form is compiled, to find which driver parameter it became."""

    __slots__ = ("index", "source")

    def __init__(self, source: str, index: int) -> None:
        self.source, self.index = source, index


class _Form:
    """One statement as the driver runs it: SQL text and how the caller's parameters become the driver's."""

    __slots__ = ("defaults", "fixed", "order", "slots", "sql")

    def __init__(self, compiled: Any, expanding: Sequence[str], params: Mapping[str, Any]) -> None:
        dialect = compiled.dialect
        sample: dict[str, Any] = {name: _Marker(name, -1) for name in params}
        sample.update({name: [_Marker(name, i) for i in range(len(params[name]))] for name in expanding})
        state = compiled.construct_expanded_state(sample)
        self.sql: str = state.statement
        self.order = tuple(state.positiontup or ()) if compiled.positional else None  # placeholder order (SQLite)
        # per driver parameter: (its name, the caller's parameter it comes from, index in that list or -1, processor)
        self.slots: list[tuple[str, str, int, Processor | None]] = []
        self.fixed: dict[str, Any] = {}  # values the statement carries itself, processed once
        self.defaults: list[tuple[str, Callable[[], Any], Processor | None]] = []  # Python-side, made per call
        prefetch = [(c, c.default) for c in compiled.insert_prefetch]
        prefetch += [(c, c.onupdate) for c in compiled.update_prefetch]
        for column, default in prefetch:  # the columns SQLAlchemy's execution would fill in
            process = column.type.dialect_impl(dialect).bind_processor(dialect)
            if default.is_callable:
                self.defaults.append((column.key, functools.partial(default.arg, None), process))
            else:
                self.fixed[column.key] = process(default.arg) if process is not None else default.arg
        filled = {name for name, _make, _process in self.defaults} | self.fixed.keys()
        for name, value in state.parameters.items():
            if name in filled:
                continue
            source = value.source if isinstance(value, _Marker) else name
            bind = compiled.binds.get(source)
            if bind is None:  # an element of a literal list, bound as name_1, name_2...
                bind = compiled.binds[source.rsplit("_", 1)[0]]
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if isinstance(value, _Marker):
                self.slots.append((name, value.source, value.index, process))
            else:
                self.fixed[name] = process(value) if process is not None else value

    def values(self, params: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        """The driver's parameters for the caller's ``params``."""
        out = dict(self.fixed)
        for name, source, index, process in self.slots:
            value = params[source] if index < 0 else params[source][index]
            out[name] = process(value) if process is not None else value
        for name, make, process in self.defaults:
            value = make()
            out[name] = process(value) if process is not None else value
        return out if self.order is None else [out[name] for name in self.order]


def _constants_inline(statement: ClauseElement, dialect: Dialect) -> ClauseElement:
    """``statement`` with the values it carries itself (``state == 'queued'``, ``LIMIT 1``) written into its SQL.

    The caller's parameters stay bound. A server caches one plan for every execution of a prepared statement
    (PostgreSQL's generic plan); with its constants bound too, that plan cannot use their statistics: counting the
    queued jobs became a scan of every job, and PostgreSQL fell back to planning the statement at each execution.
    """

    def inline(element: Any) -> Any:
        if not isinstance(element, BindParameter) or element.required or not element.unique or element.callable:
            return None  # the caller's parameters (``bindparam("name")``) need a value; defaults are callables
        values = element.value if element.expanding else [element.value]
        literal = element.type.dialect_impl(dialect).literal_processor(dialect)
        if literal is None and any(value is not None for value in values):
            return None  # a type without a safe SQL spelling stays bound
        return element.render_literal_execute()

    return visitors.replacement_traverse(statement, {}, inline)


class _Shape:
    """A statement compiled for one dialect and one set of parameter names: a form per expanding-list length, and
    how its rows come back."""

    __slots__ = ("columns", "compiled", "expanding", "forms", "results", "row")

    def __init__(self, statement: ClauseElement, dialect: Dialect, names: Sequence[str]) -> None:
        self.compiled: Any = _constants_inline(statement, dialect).compile(dialect=dialect, column_keys=list(names))
        binds = self.compiled.binds
        self.expanding = tuple(name for name in names if name in binds and binds[name].expanding)
        self.forms: dict[tuple[int, ...], _Form] = {}
        self.columns = list(getattr(statement, "exported_columns", ()))  # a select's, or what RETURNING returns
        keys = [column.key or f"c{i}" for i, column in enumerate(self.columns)]
        self.row = namedtuple("Row", keys, rename=True) if keys else None  # type: ignore[misc]
        self.results: tuple[Processor | None, ...] | None = None  # known from the first result's column types

    def form(self, params: Mapping[str, Any]) -> _Form:
        lengths = tuple(len(params[name]) for name in self.expanding)
        form = self.forms.get(lengths)
        if form is None:
            form = self.forms.setdefault(lengths, _Form(self.compiled, self.expanding, params))
        return form

    def rows(self, cursor: Any, raw_rows: Sequence[Sequence[Any]]) -> list[Any]:
        """Driver rows as SQLAlchemy would return them: values through the column types' result processors."""
        if self.results is None:  # PostgreSQL's numeric processors depend on the type the server reports
            dialect = self.compiled.dialect
            self.results = tuple(
                column.type.dialect_impl(dialect).result_processor(dialect, described[1])
                for column, described in zip(self.columns, cursor.description, strict=True)
            )
        make, results = self.row._make, self.results  # type: ignore[union-attr]
        return [
            make(v if process is None or v is None else process(v) for v, process in zip(raw, results, strict=True))
            for raw in raw_rows
        ]


class Prepared:
    """A Core statement (``select``, ``insert``, ``update``, ``delete``, with ``RETURNING`` where wanted) run on the
    driver. Build it once at import, like the statement; call it with the Session or Connection of the transaction.

    A Session's transaction begins here if it has not (a pending ORM change is flushed first, as ``Session.execute``
    would do). A Connection must already be in its transaction (``engine.begin()``) or in AUTOCOMMIT: the driver's
    own statements never start one that SQLAlchemy would know to commit.
    """

    __slots__ = ("_lock", "_shapes", "statement")

    def __init__(self, statement: ClauseElement) -> None:
        self.statement = statement
        self._shapes: dict[tuple[str, ...], _Shape] = {}
        self._lock = threading.Lock()  # compiling is rare: a shape is only ever added

    def _shape(self, dialect: Dialect, params: Mapping[str, Any]) -> _Shape:
        key = (dialect.name, *sorted(params))
        shape = self._shapes.get(key)
        if shape is None:
            with self._lock:
                shape = self._shapes.get(key) or self._shapes.setdefault(key, _Shape(self.statement, dialect, key[1:]))
        return shape

    def _run(
        self, where: Session | Connection, params: Mapping[str, Any], many: Sequence[Mapping[str, Any]] = ()
    ) -> tuple[_Shape, Any]:
        """Execute on the DBAPI connection of ``where``'s transaction (begun here if it was not): (shape, cursor)."""
        if isinstance(where, Session):
            if where.autoflush and (where.new or where.dirty or where.deleted):
                where.flush()
            connection = where.connection()
        else:
            connection = where
        shape = self._shape(connection.dialect, params)
        form = shape.form(params)
        cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        if many:
            cursor.executemany(form.sql, [form.values(p) for p in many])
        else:
            cursor.execute(form.sql, form.values(params))
        return shape, cursor

    def all(self, where: Session | Connection, params: Mapping[str, Any] | None = None) -> list[Any]:
        """Every row, as named tuples."""
        shape, cursor = self._run(where, params or {})
        try:
            return shape.rows(cursor, cursor.fetchall())
        finally:
            cursor.close()

    def first(self, where: Session | Connection, params: Mapping[str, Any] | None = None) -> Any | None:
        """The first row, or None."""
        shape, cursor = self._run(where, params or {})
        try:
            raw = cursor.fetchone()
            return None if raw is None else shape.rows(cursor, [raw])[0]
        finally:
            cursor.close()

    def scalar(self, where: Session | Connection, params: Mapping[str, Any] | None = None) -> Any:
        """The first column of the first row, or None."""
        row = self.first(where, params)
        return None if row is None else row[0]

    def rowcount(self, where: Session | Connection, params: Mapping[str, Any] | None = None) -> int:
        """Run a statement that returns no rows; how many rows it touched."""
        _shape, cursor = self._run(where, params or {})
        try:
            return int(cursor.rowcount)
        finally:
            cursor.close()

    def many(self, where: Session | Connection, rows: Sequence[Mapping[str, Any]]) -> None:
        """Run the statement once per parameter set (the driver's executemany); the sets share their keys."""
        if rows:
            self._run(where, rows[0], rows)[1].close()
