"""SQLite's commit made durable, and what a failed sync means for the next 250.

SQLite runs with ``synchronous=NORMAL`` in WAL mode (app.py), which does not
sync the WAL at commit: ``sync()`` fsyncs it after each commit the daemon
answers for (what ``synchronous=FULL`` would do, once per batch).
PostgreSQL's commit is durable by itself (and PostgreSQL stops itself when
its own fsync fails), so none of this applies to it.

When that fsync fails (EIO from a failing disk, an NFS or a thin volume out
of space), the commit has happened: its rows are visible, but whether they
survive a power loss is unknown. Linux reports a writeback error once per
open file, so the next fsync of the WAL may succeed though the pages it
lost never reached the disk. The sender of a message we answered 451 then
retries, the duplicate filter finds the copy that is already visible, and
would answer 250 for it. So after a failed sync only a **checkpoint** is
taken as proof: ``PRAGMA wal_checkpoint(TRUNCATE)`` copies every committed
page from the WAL into the database file and fsyncs that file (SQLite syncs
the WAL first; a sync that fails makes the checkpoint fail). Until one
succeeds, every commit of every process on this database is refused
(``NotDurable``, a 451 to the sender), however the next plain fsync ends:

* the failing process creates a marker file beside the database
  (``<database>-unsynced``), which each receiver looks for at every commit;
* a checkpoint that succeeds removes it; a process whose own checkpoint
  failed creates it again before it answers, so a checkpoint of another
  process that ran before this commit cannot clear it;
* the process also remembers it in memory, in case the marker cannot be
  written on the failing filesystem.
"""
from __future__ import annotations

import errno
import logging
import os
import sqlite3
import threading
from typing import Optional

from sqlalchemy import event
from sqlalchemy.engine import Engine

import database
import writelock
from models import db

log = logging.getLogger("tempmail.walsync")

MARKER_SUFFIX = "-unsynced"
CHECKPOINT_WAIT_SECONDS = 5.0  # for writers and older readers to finish, per attempt
CHECKPOINT_ATTEMPTS = 2  # the second one also gets past a sync error reported once
BACKGROUND_PAUSE_SECONDS = 0.05  # between two checkpoints of the writer's checkpointer
RESTART_FRAMES = 4000  # WAL frames (16 MiB of 4 KiB pages) before it makes the WAL start over


class NotDurable(OSError):
    """The commit happened but could not be made durable: answer 451, not 250."""


_lost_in_this_process = False


def database_path() -> Optional[str]:
    """The SQLite file of the app's engine; None for PostgreSQL or in memory."""
    return database.sqlite_file(db.engine.url)


def sync() -> None:
    """Make the last commit on SQLite durable, or raise ``NotDurable``."""
    path = database_path()
    if path is None:
        return
    if _lost_in_this_process or os.path.exists(path + MARKER_SUFFIX):
        checkpoint_or_raise(path)  # an earlier sync failed: a plain fsync proves nothing now
        return
    try:
        fd = os.open(path + "-wal", os.O_RDONLY)
    except FileNotFoundError:
        return  # not in WAL mode: the rollback journal syncs at commit
    try:
        os.fsync(fd)
    except OSError as exc:
        log.error("fsync of the SQLite WAL failed (%s): mail is refused with 451 until a checkpoint "
                  "makes the database durable", exc)
        mark_lost(path)
        checkpoint_or_raise(path)
    finally:
        os.close(fd)


def mark_lost(path: str) -> None:
    """Tell every process on this database that a sync failed."""
    global _lost_in_this_process
    _lost_in_this_process = True
    try:
        os.close(os.open(path + MARKER_SUFFIX, os.O_WRONLY | os.O_CREAT, 0o600))
    except OSError as exc:
        log.critical("cannot write %s (%s): other processes on this database may answer 250 for "
                     "mail whose commit was not made durable", path + MARKER_SUFFIX, exc)


def checkpoint_or_raise(path: str) -> None:
    """Checkpoint the whole WAL into the database file and clear the mark;
    if it cannot be done, mark again and raise ``NotDurable``."""
    global _lost_in_this_process
    for _attempt in range(CHECKPOINT_ATTEMPTS):
        outcome = checkpoint(path)
        if outcome is None:
            _lost_in_this_process = False
            try:
                os.unlink(path + MARKER_SUFFIX)
                log.warning("checkpoint done: the SQLite database is durable again, mail is accepted")
            except FileNotFoundError:
                pass
            return
    mark_lost(path)  # again: another process's checkpoint may have cleared it meanwhile
    raise NotDurable(errno.EIO, f"the SQLite database could not be made durable: {outcome}")


def checkpoint(path: str) -> Optional[str]:
    """``PRAGMA wal_checkpoint(TRUNCATE)`` on a connection of its own: None
    when every frame is in the (synced) database file, else why not."""
    try:
        conn = sqlite3.connect(path, timeout=CHECKPOINT_WAIT_SECONDS, isolation_level=None)
    except sqlite3.Error as exc:
        return f"{type(exc).__name__}: {exc}"
    try:
        busy, _log_frames, _copied = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return "busy: a writer or an older reader did not finish" if busy else None
    except sqlite3.Error as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


# --------------------------------------------------------------------------
# the writer process's checkpoints

def checkpoint_in_background(engine: Engine, stop: Optional[threading.Event] = None) -> Optional[threading.Thread]:
    """Move the writer process's WAL checkpoints out of its commits.

    By default SQLite checkpoints inside the commit that takes the WAL past
    1,000 pages: reading those pages back, writing them into the database
    file and syncing it, ~8 % of the writer's time under load, while every
    session waits for that commit (bench/README "Session 7"). Here the
    engine's connections no longer checkpoint, and a thread of their process
    does, with a connection of its own, every ``BACKGROUND_PAUSE_SECONDS``:
    SQLite's PASSIVE checkpoint waits for nobody, and runs without the GIL,
    beside the writer. Other processes on the database (web workers) keep
    SQLite's automatic checkpoints. Returns the thread (None for
    PostgreSQL or a database in memory), which runs until ``stop`` is set
    (the daemon's: as long as its process)."""
    path = database.sqlite_file(engine.url)
    if path is None:
        return None
    event.listen(engine, "connect", _no_automatic_checkpoints)
    engine.dispose()  # connections made before would still checkpoint
    thread = threading.Thread(target=_checkpoint_until, args=(path, stop or threading.Event()),
                              name="smtpd-checkpoint", daemon=True)
    thread.start()
    return thread


def _no_automatic_checkpoints(dbapi_conn, _record) -> None:
    dbapi_conn.execute("PRAGMA wal_autocheckpoint=0")


def _checkpoint_until(path: str, stop: threading.Event) -> None:
    conn, failing = None, False
    while not stop.wait(BACKGROUND_PAUSE_SECONDS):
        try:
            if conn is None:
                conn = sqlite3.connect(path, timeout=CHECKPOINT_WAIT_SECONDS, isolation_level=None,
                                       factory=writelock.QueuedWriterConnection)
                conn.use_lock(writelock.lock_path_for(path))
            checkpoint_step(conn)
            failing = False
        except Exception as exc:  # never let the thread end: nothing else checkpoints here
            # The writer's commits are unaffected (their sync does not rely on
            # a checkpoint), and the WAL only grows until the next one works.
            if not failing:
                log.warning("background checkpoint of the SQLite WAL failed: %s", exc)
            failing = True
    if conn is not None:
        conn.close()


def checkpoint_step(conn: writelock.QueuedWriterConnection) -> None:
    """One PASSIVE checkpoint; a RESTART one when the WAL holds more than
    ``RESTART_FRAMES`` frames. SQLite writes the WAL from its start again only
    when a transaction begins after *every* frame was checkpointed, which a
    checkpoint beside a busy writer never sees: RESTART, taken in the
    writers' queue (writelock.py), copies what is left while the writers
    wait and lets the next one start over, so the WAL stays bounded (as
    the automatic checkpoint, run by the committing writer, keeps it)."""
    _busy, frames, _copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    if frames > RESTART_FRAMES:
        with conn.holding():
            conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
