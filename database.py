"""The database handle and the two statements every counter in TempMail uses.

``db`` is the Flask-SQLAlchemy extension (models.py declares the tables on
it); ``insert_ignore`` and ``upsert_add`` are the race-free INSERTs of
SQLite and PostgreSQL that keep concurrent workers exact. ``write_gate``
queues short SQLite write transactions of many threads and processes
instead of letting them collide in SQLite's lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from typing import Iterator, Optional

from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase


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


def upsert_add_many(model, key: str, column: str, rows: list[dict]) -> dict:
    """``upsert_add`` for many rows at once: each row dict holds ``key``,
    ``column`` (the amount to add) and the columns of a new row. One
    multi-row ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` per
    UPSERT_ROWS rows instead of one statement per row; returns
    ``{key value: new column value}``. Rows are sent sorted by key, so two
    writers lock rows in the same order (no deadlock on PostgreSQL)."""
    insert = pg_insert if db.session.get_bind().dialect.name == "postgresql" else sqlite_insert
    table = model.__table__
    key_col, col = table.c[key], table.c[column]
    rows, out = sorted(rows, key=lambda r: r[key]), {}
    for start in range(0, len(rows), UPSERT_ROWS):
        stmt = insert(table).values(rows[start:start + UPSERT_ROWS])
        stmt = stmt.on_conflict_do_update(index_elements=[key], set_={column: col + stmt.excluded[column]})
        for key_value, value in db.session.execute(stmt.returning(key_col, col)):
            out[key_value] = value
    return out


# --------------------------------------------------------------------------
# a queue in front of SQLite's one writer lock

_gate = threading.Lock()
_gate_files: dict[str, tuple[int, int]] = {}  # lock file -> (pid that opened it, fd)


def sqlite_lock_path() -> Optional[str]:
    """The lock file of the app's SQLite database (``<file>-writelock``, next
    to its ``-wal`` and ``-shm``), or None for another database or an
    in-memory one."""
    url = db.engine.url
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:" \
            or url.database.startswith("file:"):
        return None
    return url.database + "-writelock"


def _lock_fd(path: str) -> int:
    """This process's descriptor of ``path``: a worker forked from a parent
    that had one opens its own, because flock() locks belong to an open file
    description, which a fork shares."""
    pid, fd = _gate_files.get(path, (None, -1))
    if pid != os.getpid():
        if fd >= 0:
            os.close(fd)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        _gate_files[path] = (os.getpid(), fd)
    return fd


@contextlib.contextmanager
def write_gate() -> Iterator[None]:
    """Hold the host's SQLite write queue around one short write transaction
    (start it and commit it inside). SQLite lets one writer in at a time and
    makes the others sleep in its busy handler (1, 2, 5, 10 ... 100 ms per
    try), so under many concurrent writers the losers sleep far longer than
    the writes take. Here they wait in a queue instead: a lock per process,
    then ``flock`` on a file next to the database for the processes of the
    host (gunicorn's workers), each woken the moment the previous one is
    done. Writers that do not pass here (the mail daemon) still meet SQLite's
    own lock, as before. On PostgreSQL only the process lock is taken: its
    row locks already queue waiters."""
    with _gate:
        path = sqlite_lock_path()
        if path is None:
            yield
            return
        fd = _lock_fd(path)
        fcntl.flock(fd, fcntl.LOCK_EX)  # waits without the GIL
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
