"""The host-wide queue for SQLite's writer (writelock.py): every write
transaction of every process holds it from its first write to its end, so
concurrent writers wait in the queue instead of SQLite's sleeping busy
handler, and no count is lost; reads never wait for it; a thread writing
through a second connection does not wait for itself."""
from __future__ import annotations

import fcntl
import os
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import text

import writelock
from models import db

WORKER = """
import sqlite3, sys, threading
sys.path.insert(0, {root!r})
import writelock
def work():
    conn = sqlite3.connect({db!r}, timeout=30, factory=writelock.QueuedWriterConnection,
                           check_same_thread=False)
    conn.use_lock(writelock.lock_path_for({db!r}))
    for _ in range({rounds}):
        value = conn.execute("SELECT n FROM counter").fetchone()[0]  # read, then write: a lost
        conn.execute("UPDATE counter SET n = n + 1")                   # update would show
        conn.commit()
    conn.close()
threads = [threading.Thread(target=work) for _ in range({threads})]
for t in threads: t.start()
for t in threads: t.join()
"""


def connect(path: Path) -> writelock.QueuedWriterConnection:
    conn = sqlite3.connect(path, timeout=30, factory=writelock.QueuedWriterConnection, check_same_thread=False)
    conn.use_lock(writelock.lock_path_for(str(path)))
    return conn


def lock_is_free(path: Path) -> bool:
    """True when no process or connection holds the writer lock of ``path``."""
    fd = os.open(writelock.lock_path_for(str(path)), os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.fixture
def counter_db(tmp_path) -> Path:
    path = tmp_path / "counter.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE counter (n INTEGER)")
    conn.execute("INSERT INTO counter VALUES (0)")
    conn.commit()
    conn.close()
    return path


def test_processes_and_threads_queue_and_count_exactly(counter_db):
    root = str(Path(__file__).resolve().parents[1])
    script = WORKER.format(root=root, db=str(counter_db), rounds=150, threads=4)
    procs = [subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE) for _ in range(3)]
    errors = [p.communicate(timeout=120)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    conn = sqlite3.connect(counter_db)
    assert conn.execute("SELECT n FROM counter").fetchone()[0] == 3 * 4 * 150
    conn.close()
    assert lock_is_free(counter_db)


def test_held_from_the_first_write_to_commit_rollback_or_close(counter_db):
    conn = connect(counter_db)
    conn.execute("SELECT n FROM counter").fetchone()
    assert lock_is_free(counter_db)  # reads do not queue
    for end in ("commit", "rollback", "close"):
        if end == "close":
            conn = connect(counter_db)
        conn.execute("UPDATE counter SET n = n + 1")
        assert not lock_is_free(counter_db)
        conn.execute("UPDATE counter SET n = n + 1")  # the same transaction: no second wait
        getattr(conn, end)()
        assert lock_is_free(counter_db), end


def test_a_reader_is_not_held_up_by_a_writer(counter_db):
    writer, reader = connect(counter_db), connect(counter_db)
    writer.execute("UPDATE counter SET n = 41")
    assert reader.execute("SELECT n FROM counter").fetchone()[0] == 0  # WAL: the last committed value
    writer.commit()
    assert reader.execute("SELECT n FROM counter").fetchone()[0] == 41


def test_a_thread_writing_through_two_connections_does_not_wait_for_itself(counter_db):
    """Its second connection skips the queue (waiting there would be waiting
    for itself, forever) and meets SQLite's own lock, as without the queue:
    "database is locked" once its busy timeout is over."""
    first = connect(counter_db)
    second = sqlite3.connect(counter_db, timeout=0.2, factory=writelock.QueuedWriterConnection,
                             check_same_thread=False)
    second.use_lock(writelock.lock_path_for(str(counter_db)))
    outcome = []

    def nested():
        first.execute("UPDATE counter SET n = n + 1")
        try:
            second.execute("UPDATE counter SET n = n + 1")
        except sqlite3.OperationalError as exc:
            outcome.append(str(exc))
        first.commit()
        second.execute("UPDATE counter SET n = n + 1")  # its own turn, once the first ended
        second.commit()
        outcome.append("done")

    thread = threading.Thread(target=nested)
    thread.start()
    thread.join(timeout=20)
    assert outcome == ["database is locked", "done"]
    assert first.execute("SELECT n FROM counter").fetchone()[0] == 2
    assert lock_is_free(counter_db)


def test_the_app_queues_on_its_sqlite_file_only(app, backend):
    with app.app_context():
        conn = db.session.connection().connection.dbapi_connection
        db.session.execute(text("SELECT 1"))
        if backend == "sqlite":
            assert isinstance(conn, writelock.QueuedWriterConnection)
            assert conn.lock_path == db.engine.url.database + "-writer.lock"
        else:
            assert not isinstance(conn, sqlite3.Connection)
        db.session.rollback()
    assert writelock.lock_path_for(":memory:") is None


def test_a_holder_that_never_lets_go_does_not_stop_the_others_for_good(counter_db, monkeypatch):
    """Waits end (after SQLite's busy timeout, here shortened): the writer
    then meets SQLite's own lock and its error, instead of waiting forever;
    a holder dropped without close() frees the queue when it is collected."""
    monkeypatch.setattr(writelock, "WAIT_SECONDS", 0.3)
    holder = connect(counter_db)
    holder.execute("UPDATE counter SET n = n + 1")  # holds the queue and SQLite's lock
    outcome = []

    def other():
        conn = sqlite3.connect(counter_db, timeout=0.2, factory=writelock.QueuedWriterConnection)
        conn.use_lock(writelock.lock_path_for(str(counter_db)))
        try:
            conn.execute("UPDATE counter SET n = n + 1")
        except sqlite3.OperationalError as exc:
            outcome.append(str(exc))
        conn.close()

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(timeout=20)
    assert outcome == ["database is locked"]
    holder.rollback()
    holder.execute("UPDATE counter SET n = n + 1")
    del holder  # dropped while holding, never closed
    import gc
    gc.collect()
    assert lock_is_free(counter_db)
