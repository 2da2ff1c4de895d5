"""The database handle and the two statements every counter in TempMail uses.

``db`` is the Flask-SQLAlchemy extension (models.py declares the tables on
it); ``insert_ignore`` and ``upsert_add`` are the race-free INSERTs of
SQLite and PostgreSQL that keep concurrent workers exact.
"""
from __future__ import annotations

import functools
import weakref
from typing import Any, Optional

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy import event, text
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Dialect
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Session


class Base(DeclarativeBase):
    pass


# Rows stay readable after a commit without a refresh query: cheaper, and a
# row another worker deletes meanwhile cannot turn a finished answer into a
# 500 (ObjectDeletedError on the refresh).
db = SQLAlchemy(model_class=Base, session_options={"expire_on_commit": False})


def insert_ignore(model, index_elements: list[str], **values) -> None:
    """INSERT a row unless one with the same unique key exists (a concurrent
    creator included): ``ON CONFLICT DO NOTHING`` on SQLite and PostgreSQL."""
    dialect = db.session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        insert = pg_insert if dialect == "postgresql" else sqlite_insert
        db.session.execute(insert(model).values(**values).on_conflict_do_nothing(
            index_elements=index_elements))
        return
    try:  # other databases: a savepoint absorbs the lost creation race
        with db.session.begin_nested():
            db.session.add(model(**values))
    except IntegrityError:
        pass


def upsert_add(model, key: dict, column: str, amount: int, **extra) -> int:
    """Add ``amount`` to ``column`` of the row with unique ``key``, creating
    it (with ``extra``) when missing, as one atomic statement; returns the new
    value. Concurrent callers each add exactly their amount."""
    insert = pg_insert if db.session.get_bind().dialect.name == "postgresql" else sqlite_insert
    col = getattr(model.__table__.c, column)
    stmt = insert(model).values(**key, **extra, **{column: amount})
    stmt = stmt.on_conflict_do_update(index_elements=list(key), set_={column: col + amount})
    return db.session.execute(stmt.returning(col)).scalar_one()


UPSERT_ROWS = 500  # rows per statement: 1,500 parameters, far below SQLite's limit


def sqlite_file(url) -> Optional[str]:
    """The file of a SQLite engine URL; None for another database or one in memory."""
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return url.database


def numbered(rows: list, names) -> dict:
    """The parameters of a multi-row statement: ``<name>_<i>`` for each name
    of each row (a mapping) ``i``, as the ``..._many`` statements spell them."""
    return {f"{name}_{i}": row[name] for i, row in enumerate(rows) for name in names}


def upsert_add_many(model, key: str, column: str, rows: list[dict]) -> dict:
    """``upsert_add`` for many rows at once: each row dict holds ``key``,
    ``column`` (the amount to add) and the columns of a new row. One
    multi-row ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` per
    UPSERT_ROWS rows instead of one statement per row; returns
    ``{key value: new column value}``. Rows are sent sorted by key, so two
    writers lock rows in the same order (no deadlock on PostgreSQL)."""
    dialect = db.session.get_bind().dialect.name
    rows = sorted(rows, key=lambda r: r[key])
    names = tuple(rows[0]) if rows else ()
    return dict(run_in_parts(rows, names, UPSERT_ROWS,
                             _upsert_statement, dialect, model.__table__, key, column, names))


def run_in_parts(rows: list, names, per_statement: int, build: Any, *shape: Any) -> list[tuple]:
    """Run a multi-row statement over ``rows`` (mappings holding ``names``),
    ``per_statement`` rows at a time, in the session's transaction on its raw
    cursor (no SQLAlchemy execution path): ``build(*shape, count)`` with
    parameters ``<name>_<i>``, compiled once per count (``prepared``).
    Returns the result rows of every part (none for a statement without
    RETURNING)."""
    cursor, out = raw_cursor(), []
    for start in range(0, len(rows), per_statement):
        part = rows[start:start + per_statement]
        prepared(build, *shape, len(part)).run(cursor, **numbered(part, names))
        if cursor.description is not None:
            out.extend(cursor.fetchall())
    return out


@functools.lru_cache(maxsize=256)
def _upsert_statement(dialect: str, table, key: str, column: str, names: tuple, count: int):
    """The multi-row upsert of ``count`` rows as SQL text, written once per
    shape. SQLAlchemy gives an ``ON CONFLICT DO UPDATE`` construct no cache
    key, so it compiled the statement anew for every batch, which cost more
    than running it. The same SQL on SQLite (3.35+) and PostgreSQL; every
    name in it is one of our own tables' and columns'."""
    del dialect  # part of the cache key only: one engine per process, either kind
    rows = ", ".join("(" + ", ".join(f":{name}_{i}" for name in names) + ")" for i in range(count))
    return text(f"INSERT INTO {table.name} ({', '.join(names)}) VALUES {rows} "
                f"ON CONFLICT ({key}) DO UPDATE SET {column} = {table.name}.{column} + excluded.{column} "
                f"RETURNING {key}, {column}")


class Prepared:
    """A Core statement compiled once for a dialect and run on a raw DBAPI
    cursor: SQLAlchemy's per-execution work (parameters, result objects) was
    three quarters of a cheap validation's cost. Results are plain tuples of
    the driver's own values (``result_processor`` turns one into SQLAlchemy's
    where a caller needs that)."""

    def __init__(self, statement, dialect: Dialect) -> None:
        # An IN list of fixed values is rendered into the SQL, which needs a
        # value for every parameter at compile time: None stands in for the
        # ones given per run.
        # (INSERT/UPDATE statements take no ``params()``, and need none: they
        # hold no IN list.)
        required = {name: None for name, bind in statement.compile(dialect=dialect).binds.items() if bind.required}
        if required and not statement.is_dml:
            statement = statement.params(required)
        compiled = statement.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
        self.sql = compiled.string
        self.fixed = dict(compiled.params)  # literal values such as an IN list
        self.order = compiled.positiontup if compiled.positional else None
        # The dialect's own form of each type (SQLite's DATETIME writes the
        # text SQLAlchemy reads back; the generic type would leave it to the driver).
        self.binders = {name: bind.type.dialect_impl(dialect).bind_processor(dialect)
                        for name, bind in compiled.binds.items()}

    def rows(self, cursor, **params: Any) -> list[tuple]:
        """All rows of the statement for ``params``."""
        self.run(cursor, **params)
        return cursor.fetchall()

    def run(self, cursor, **params: Any) -> None:
        """Run a statement that returns no rows (a DBAPI cursor may refuse
        ``fetchall`` after one)."""
        values = dict(self.fixed)
        for name, value in params.items():
            binder = self.binders.get(name)
            values[name] = binder(value) if binder is not None else value
        cursor.execute(self.sql, [values[n] for n in self.order] if self.order is not None else values)


@functools.lru_cache(maxsize=512)
def _prepare(dialect: str, driver: str, build: Any, shape: tuple) -> Prepared:
    del dialect, driver  # the cache key: one compiled form per kind of database
    return Prepared(build(*shape) if shape else build, db.engine.dialect)


def prepared(build: Any, *shape: Any) -> Prepared:
    """A statement compiled once per dialect: ``build`` itself (a statement
    built once), or ``build(*shape)`` per shape (e.g. the number of rows of a
    multi-row INSERT). The writer of mail runs its statements so: the
    SQLAlchemy execution path cost more than running them."""
    dialect = db.engine.dialect
    return _prepare(dialect.name, dialect.driver, build, shape)


@functools.lru_cache(maxsize=64)
def _result_processor(dialect: str, driver: str, type_) -> Any:
    del dialect, driver  # the cache key
    return type_.dialect_impl(db.engine.dialect).result_processor(db.engine.dialect, None)


def result_processor(type_) -> Any:
    """The function that turns the driver's value of a column of ``type_``
    into SQLAlchemy's (e.g. SQLite's text of a date into a datetime), or None
    when the driver's value is already it."""
    dialect = db.engine.dialect
    return _result_processor(dialect.name, dialect.driver, type_)


# Each session's DBAPI connection of its current transaction (weakly held:
# a session that is gone takes its entry along).
_RAW: "weakref.WeakKeyDictionary[Session, Any]" = weakref.WeakKeyDictionary()


def raw_cursor():
    """A DBAPI cursor on the session's connection, in its transaction. On
    SQLite it is writelock's queued cursor, so a write through it queues for
    the host's writer lock like any other; errors are the driver's own."""
    # Remembered per transaction (see _remember_connection): asking the
    # session for its connection cost more than the cursor's statement.
    session = db.session()
    connection = _RAW.get(session)
    if connection is None:
        connection = session.connection().connection.dbapi_connection
    return connection.cursor()


@event.listens_for(Session, "after_begin")
def _remember_connection(session, _transaction, connection) -> None:
    _RAW[session] = connection.connection.dbapi_connection


@event.listens_for(Session, "after_transaction_end")
def _forget_connection(session, transaction) -> None:
    if transaction.parent is None:  # the session's own transaction, not a savepoint
        _RAW.pop(session, None)
