"""A queue for SQLite's one writer, shared by every process of a host.

SQLite lets one connection write at a time. A connection that finds the
write lock taken sleeps in SQLite's busy handler and tries again after 1,
2, 5, 10, ... 100 ms, however soon the lock came free: with the mail
daemon's writer, several receiver processes and two web workers all
writing (messages, quota reservations, rate limits), the losers slept far
longer than the transactions they waited for took (a 1.4 s p99 on the
keyed listing; a second receiver process slower than one).

So before its first write statement a connection queues: on a lock shared
by the threads of its process, then on an ``flock(2)`` of a file beside the
database shared by the processes of the host. The next thread of a process wakes the
moment the holder commits or rolls back; the one waiting for another
process polls the file lock less than 1 ms apart. Waits end after 30 s
(SQLite's busy timeout) and the statement then meets SQLite's own lock. SQLite's own locking stays
underneath, unchanged, for whatever does not queue here (the ``sqlite3``
shell, another program). Reads never queue (WAL: readers do not block).

The lock is taken by the statement that begins a transaction in Python's
``sqlite3`` module (INSERT, UPDATE, DELETE, REPLACE) and released by the
transaction's end (commit, rollback, close), so it spans exactly SQLite's
own write lock. A thread that already holds it through another connection
does not queue again (it would wait for itself); SQLite's busy timeout
applies there, as before.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
import time
from typing import Iterator, Optional

WRITE_VERBS = ("INSERT", "UPDATE", "DELETE", "REPLACE")
WAIT_SECONDS = 30.0  # as SQLite's busy_timeout: past it, go on and let SQLite decide

_process_locks: dict[str, threading.Lock] = {}
_owners: dict[str, int] = {}  # lock path -> thread ident holding it in this process
_guard = threading.Lock()


def lock_path_for(database: str) -> Optional[str]:
    """The lock file of a SQLite database file; None for in-memory databases."""
    return None if not database or database == ":memory:" else database + "-writer.lock"


def _process_lock(path: str) -> threading.Lock:
    with _guard:
        return _process_locks.setdefault(path, threading.Lock())


def _flock_until(fd: int, deadline: float) -> bool:
    """Take the host-wide lock by ``deadline``. Only one thread per process
    waits here (the others wait on the process lock), so it polls: a
    blocking flock() cannot time out, and a holder that never lets go (a
    connection lost without being closed) must not stop every writer of
    the host for good. Polls start at 50 us and stay under 1 ms apart."""
    pause = 0.00005
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(pause)
            pause = min(pause * 2, 0.001)


class QueuedCursor(sqlite3.Cursor):
    """A cursor whose write statements queue for the host's writer lock first."""

    def execute(self, sql, parameters=()):
        self.connection.before_statement(sql)
        return super().execute(sql, parameters)

    def executemany(self, sql, seq_of_parameters):
        self.connection.before_statement(sql)
        return super().executemany(sql, seq_of_parameters)


class QueuedWriterConnection(sqlite3.Connection):
    """``sqlite3.connect(..., factory=QueuedWriterConnection)``; call
    ``use_lock(path)`` once connected to turn the queue on."""

    lock_path: Optional[str] = None
    _fd: Optional[int] = None
    _held = False

    def use_lock(self, path: Optional[str]) -> None:
        """Queue this connection's writes on ``path`` (None: never queue)."""
        self.lock_path = path

    def cursor(self, factory=None):
        return super().cursor(factory or QueuedCursor)

    def execute(self, sql, parameters=()):
        return self.cursor().execute(sql, parameters)

    def before_statement(self, sql: str) -> None:
        """Queue for the writer lock before a statement that starts a write
        transaction (later statements of the same transaction find it held)."""
        if self._held or self.lock_path is None or self.in_transaction:
            return
        if sql.lstrip()[:7].upper().startswith(WRITE_VERBS):
            self._acquire()

    def _acquire(self) -> None:
        path, me = self.lock_path, threading.get_ident()
        if _owners.get(path) == me:
            return  # this thread writes through another connection already
        deadline = time.monotonic() + WAIT_SECONDS
        if not _process_lock(path).acquire(timeout=WAIT_SECONDS):
            return
        try:
            if self._fd is None:
                self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            locked = _flock_until(self._fd, deadline)
        except BaseException:
            _process_lock(path).release()
            raise
        if not locked:
            _process_lock(path).release()
            return
        _owners[path], self._held = me, True

    def _release(self) -> None:
        if not self._held:
            return
        self._held = False
        _owners.pop(self.lock_path, None)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            _process_lock(self.lock_path).release()

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Hold the writer lock outside a transaction: for a checkpoint that
        must wait in the writers' queue, not behind it in SQLite's busy
        handler, where a busy writer would keep it waiting for good."""
        self._acquire()
        try:
            yield
        finally:
            self._release()

    def commit(self) -> None:
        try:
            super().commit()
        finally:
            self._release()

    def rollback(self) -> None:
        try:
            super().rollback()
        finally:
            self._release()

    def __del__(self) -> None:
        # A connection dropped without close() (a test's abandoned thread, an
        # engine disposed while it was checked out) must not keep the queue.
        try:
            self._release()
        except Exception:
            pass

    def close(self) -> None:
        try:
            self._release()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        finally:
            super().close()
