"""The writer process's checkpoints run beside its commits, not inside them
(``walsync.checkpoint_in_background``): the engine's connections no longer
checkpoint, a thread does, and the WAL's pages reach the database file
without any commit paying for it."""
from __future__ import annotations

import os
import threading
import time

import pytest
from sqlalchemy import create_engine, event, text

import walsync
import writelock


def database_pages_after(engine, path: str, wait: float) -> int:
    """Write ~2 MiB through ``engine``; the database file's size after ``wait`` seconds."""
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, data BLOB)"))
    for _ in range(4):
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t (data) VALUES (randomblob(1024))"), [{}] * 512)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and os.path.getsize(path) < 2 * 1024 * 1024:
        time.sleep(0.02)
    return os.path.getsize(path)


@pytest.fixture
def stop():
    """Ends the test's checkpoint thread (the daemon's runs as long as its process)."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def engine(tmp_path):
    path = tmp_path / "wal.db"
    # As app.py makes them: writers queue for the host's writer lock.
    engine = create_engine(f"sqlite:///{path}", connect_args={"factory": writelock.QueuedWriterConnection})
    event.listen(engine, "connect", lambda conn, _record: conn.use_lock(writelock.lock_path_for(str(path))))
    with engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    yield engine, str(path)
    engine.dispose()


def test_commits_do_not_checkpoint_and_a_thread_does(engine, stop):
    engine, path = engine
    thread = walsync.checkpoint_in_background(engine, stop)
    assert thread is not None and thread.is_alive() and thread.daemon
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA wal_autocheckpoint").scalar() == 0
    # 2,048 pages committed: past SQLite's automatic checkpoint at 1,000, so
    # only the thread can have moved them into the database file.
    assert database_pages_after(engine, path, wait=10) >= 2 * 1024 * 1024


def test_without_the_thread_nothing_reaches_the_file(engine, stop, monkeypatch):
    """The measure above is sound: with automatic checkpoints off and no
    thread, the pages stay in the WAL."""
    engine, path = engine
    monkeypatch.setattr(walsync.threading.Thread, "start", lambda self: None)
    walsync.checkpoint_in_background(engine, stop)
    assert database_pages_after(engine, path, wait=0.5) < 1024 * 1024


def test_postgresql_and_memory_need_none():
    assert walsync.checkpoint_in_background(create_engine("sqlite://")) is None
    assert walsync.checkpoint_in_background(create_engine("postgresql+psycopg://u@localhost/db")) is None


def test_the_wal_starts_over_under_steady_commits(engine, stop, monkeypatch):
    """A writer that commits without pause never begins a transaction
    right after a complete PASSIVE checkpoint; RESTART makes the WAL start
    over anyway, so it stays bounded instead of growing for as long as mail
    keeps coming."""
    engine, path = engine
    monkeypatch.setattr(walsync, "RESTART_FRAMES", 300)
    monkeypatch.setattr(walsync, "BACKGROUND_PAUSE_SECONDS", 0.01)
    walsync.checkpoint_in_background(engine, stop)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY, data BLOB)"))
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO t (data) VALUES (randomblob(3000))"), [{}] * 8)
    frames = os.path.getsize(path + "-wal") // 4096
    rows = engine.connect().exec_driver_sql("SELECT count(*) FROM t").scalar()
    assert rows > 3000  # a page or more per row
    # The file keeps its high-water mark: a checkpoint thread descheduled for
    # a few tenths of a second on a busy machine (1,541 frames once, in a
    # full run, against a limit of 300) must not fail this. Without RESTART
    # the WAL holds every frame written: over 200,000 here.
    assert frames < 20 * 300, f"the WAL grew to {frames} frames for {rows} rows written"


def test_the_thread_outlives_a_failing_checkpoint(engine, stop, monkeypatch, caplog):
    """A checkpoint that fails (here: the lock file cannot be opened) is
    logged once and tried again; the thread goes on, since nothing else
    checkpoints the writer's WAL."""
    engine, path = engine
    calls = []

    def failing_step(conn):
        calls.append(1)
        raise OSError("no lock file")
    monkeypatch.setattr(walsync, "checkpoint_step", failing_step)
    monkeypatch.setattr(walsync, "BACKGROUND_PAUSE_SECONDS", 0.01)
    thread = walsync.checkpoint_in_background(engine, stop)
    deadline = time.monotonic() + 10
    while len(calls) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) >= 5 and thread.is_alive()
    assert caplog.text.count("background checkpoint of the SQLite WAL failed: no lock file") == 1
    stop.set()
    thread.join(timeout=5)
    assert not thread.is_alive()
