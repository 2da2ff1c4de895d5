"""New-mail events across processes and hosts: how a held request (a long
poll, a live stream) learns within milliseconds that mail it waits for has
been stored, without a sleep loop per request.

Publishing happens in ``DeliveryBatch.commit`` (mailhandler.py), the one
place deliveries commit, for every receiver (daemon, pipe, IMAP, import):

* PostgreSQL: ``announce()`` runs ``pg_notify('tempmail_new_mail', '<mailbox
  ids>')`` inside the delivery's own transaction. PostgreSQL sends it when,
  and only if, the rows commit, to every listening connection of every
  host, so web hosts and mail hosts need nothing shared but the database.
* SQLite: ``delivered()`` sends, after the commit, one empty datagram to
  each web worker's Unix socket in the folder ``<database file>-events/``
  (next to the database, so exactly the processes that share a database
  share the folder; ``instance/tempmail.db-events/`` by default).

Listening: each web worker process has one ``Hub`` per database and one
listener thread (started with the first held request) that rings the
waiters of the mailboxes named, so a thousand waiters cost one database
connection (PostgreSQL) or one socket (SQLite) per process, not one each.

Why datagram sockets for SQLite rather than inotify on a file: a datagram is
queued by the kernel for exactly the processes that listen, costs no disk
write, needs no extra package (the stdlib has no inotify), and a worker that
died is noticed at once (``ECONNREFUSED``: the sender deletes its socket
file). The SQLite listener does not trust the datagrams to say what is new:
on every wake-up it asks the database for messages above the highest id it
has seen (SQLite has one writer at a time, so ids commit in order). A lost
or coalesced datagram therefore loses nothing, and a full socket queue
(``EAGAIN``) already holds a wake-up that covers the new mail too.
PostgreSQL hands out ids out of commit order, so there the notification
itself names the mailboxes.
"""
from __future__ import annotations

import atexit
import logging
import os
import secrets
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from flask import current_app
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import NullPool

from database import db
from models import Message

log = logging.getLogger("tempmail.events")

CHANNEL = "tempmail_new_mail"
# Mailbox ids per NOTIFY: 400 ids of at most 16 digits and a comma stay
# well below PostgreSQL's 8,000-byte payload limit.
PAYLOAD_IDS = 400
SOCKET_MODE = 0o660  # the daemon and the web workers share a user or a group
DEGRADED_NAP = 1.0  # seconds between re-checks while no listener runs
MAX_UNIX_PATH = 100  # sun_path holds 108 bytes; longer paths go through /proc


# --------------------------------------------------------------------------
# waiters

class Waiter:
    """One held request's doorbell: armed before each look at the database,
    so a ring between the look and the sleep is never missed."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = threading.Event()

    def arm(self) -> None:
        self.event.clear()

    def ring(self) -> None:
        self.event.set()

    def sleep(self, seconds: float) -> bool:
        """Sleep until rung or ``seconds`` pass; True when rung."""
        return self.event.wait(max(0.0, seconds))


class Hub:
    """The waiters of one process on one database, by mailbox id, and
    whether a listener is running to ring them."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.waiters: dict[int, set[Waiter]] = {}
        self.healthy = False  # no listener yet: waiters re-check every second

    @contextmanager
    def watch(self, mailbox_id: int) -> Iterator[Waiter]:
        """A waiter rung whenever mail for ``mailbox_id`` may have arrived."""
        waiter = Waiter()
        with self.lock:
            self.waiters.setdefault(mailbox_id, set()).add(waiter)
        try:
            yield waiter
        finally:
            with self.lock:
                group = self.waiters.get(mailbox_id)
                if group is not None:
                    group.discard(waiter)
                    if not group:
                        del self.waiters[mailbox_id]

    def ring(self, mailbox_ids: Iterable[int]) -> None:
        with self.lock:
            rung = [w for m in set(mailbox_ids) for w in self.waiters.get(m, ())]
        for waiter in rung:
            waiter.ring()

    def ring_all(self) -> None:
        """Every waiter looks again (after events may have been missed)."""
        with self.lock:
            rung = [w for group in self.waiters.values() for w in group]
        for waiter in rung:
            waiter.ring()

    def nap(self, left: float) -> float:
        """How long a waiter may sleep: all that is left while a listener
        rings it, at most a second while none does (the database is down
        or the listener is reconnecting)."""
        return left if self.healthy else min(left, DEGRADED_NAP)

    def waiting(self) -> int:
        with self.lock:
            return sum(len(group) for group in self.waiters.values())


_hubs: dict[tuple, Hub] = {}
_hubs_lock = threading.Lock()
# Set when this process begins to stop: held requests end at once (a long
# poll answers with what there is, a stream closes and its client resumes
# with Last-Event-ID on another worker) instead of holding the shutdown.
STOPPING = threading.Event()


def shutdown() -> None:
    """End every held request of this process (gunicorn's SIGTERM, see
    deploy/gunicorn.conf.py); safe to call from a signal handler."""
    STOPPING.set()
    for found in list(_hubs.values()):
        found.ring_all()


def hub_key(engine: Engine) -> tuple:
    # The pid: a forked child must start its own listener, not use a copy.
    return os.getpid(), engine.url.render_as_string(hide_password=False)


def hub() -> Hub:
    """This process's hub for the current app's database; its listener is
    started on first use, before the caller first looks at the database.
    Callers hold no pooled connection while they call this: a thousand
    requests arriving at once would otherwise hold the whole pool while
    queueing behind the one that starts the listener."""
    engine = db.engine
    key = hub_key(engine)
    with _hubs_lock:
        found = _hubs.get(key)
        if found is None:
            found = _hubs[key] = Hub()
            start_listener(found, engine, live_config("listen_url"))
    return found


def wait_for(mailbox_id: int, probe: Callable[[], bool], seconds: float) -> bool:
    """Hold the caller until ``probe()`` is true or ``seconds`` pass; True
    when it became true. ``probe`` runs at once and again after every ring
    for ``mailbox_id``; the session is closed after each run, so no
    database connection is held while waiting."""
    deadline = time.monotonic() + seconds
    db.session.close()  # give the connection back before queueing for the hub (see hub())
    current = hub()
    with current.watch(mailbox_id) as waiter:
        while True:
            waiter.arm()
            try:
                found = probe()
            finally:
                db.session.close()
            left = deadline - time.monotonic()
            if found or left <= 0 or STOPPING.is_set():
                return found
            waiter.sleep(current.nap(left))


# --------------------------------------------------------------------------
# how many requests one process holds

class Busy(Exception):
    """Every slot for held requests of this process is taken."""


class Slot:
    """One held request's place in this process; ``release`` is idempotent
    (a stream's slot is released when the response closes, whichever way)."""

    count = 0
    lock = threading.Lock()

    def __init__(self) -> None:
        self.released = False

    @classmethod
    def take(cls, limit: int) -> "Slot":
        """A slot, or Busy when ``limit`` requests are already held here."""
        with cls.lock:
            if cls.count >= limit:
                raise Busy()
            cls.count += 1
        return cls()

    def release(self) -> None:
        with Slot.lock:
            if not self.released:
                self.released = True
                Slot.count -= 1


@contextmanager
def held(limit: int) -> Iterator[Slot]:
    """Hold one slot for the duration of a ``with`` block (raises Busy)."""
    slot = Slot.take(limit)
    try:
        yield slot
    finally:
        slot.release()


def live_config(key: str):
    """One key of the ``live`` configuration section."""
    return current_app.config["TEMPMAIL"]["live"][key]


def hold_until(mailbox_id: int, probe: Callable[[], bool], seconds: float) -> bool:
    """``wait_for`` in one of this process's slots for held requests
    (``live.max_held_per_process``); raises Busy when none is free, so an
    API can answer 503 instead of tying up the threads ordinary requests need."""
    with held(int(live_config("max_held_per_process"))):
        return wait_for(mailbox_id, probe, seconds)


# --------------------------------------------------------------------------
# publishing (DeliveryBatch.commit)

def announce(mailbox_ids: set[int]) -> None:
    """Before the delivery commits: on PostgreSQL, queue the notification in
    its transaction (sent at commit, dropped with a rollback)."""
    if not mailbox_ids or db.engine.dialect.name != "postgresql":
        return
    ordered = sorted(mailbox_ids)
    for start in range(0, len(ordered), PAYLOAD_IDS):
        payload = ",".join(str(i) for i in ordered[start:start + PAYLOAD_IDS])
        db.session.execute(text("SELECT pg_notify(:channel, :payload)"),
                           {"channel": CHANNEL, "payload": payload})


def delivered(mailbox_ids: set[int]) -> None:
    """After the delivery committed: ring this process's own waiters, and on
    SQLite poke every other process sharing the database. Never raises: the
    mail is stored, and a wake-up lost here only delays a waiter."""
    if not mailbox_ids:
        return
    try:
        engine = db.engine
        local = _hubs.get(hub_key(engine))
        if local is not None:
            local.ring(mailbox_ids)
        folder = events_folder(engine)
        if folder is not None:
            poke(folder)
    except Exception:  # noqa: BLE001 - see the docstring
        log.exception("could not announce new mail")


def events_folder(engine: Engine) -> Optional[Path]:
    """``<database file>-events`` for a SQLite file, else None (PostgreSQL
    notifies by itself; an in-memory database has no other process)."""
    if engine.dialect.name != "sqlite":
        return None
    name = engine.url.database
    if not name or name == ":memory:" or name.startswith("file:"):
        return None
    return Path(name + "-events")


def unix_path(folder: Path, folder_fd: int, name: str) -> str:
    """The address of socket ``name`` in ``folder``: its path, or, when that
    is longer than a Unix socket address holds, the same file reached
    through the folder's open descriptor."""
    path = str(folder / name)
    if len(path.encode()) <= MAX_UNIX_PATH:
        return path
    return f"/proc/self/fd/{folder_fd}/{name}"


_sender: Optional[socket.socket] = None
_sender_pid = 0


def sender() -> socket.socket:
    """This process's unbound, non-blocking datagram socket for pokes."""
    global _sender, _sender_pid
    if _sender is None or _sender_pid != os.getpid():
        _sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        _sender.setblocking(False)
        _sender_pid = os.getpid()
    return _sender


def poke(folder: Path) -> None:
    """One datagram to every listener socket in ``folder``; the socket of a
    process that died is deleted (nothing is bound to it any more)."""
    try:
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return  # no web worker has listened yet
    try:
        for name in os.listdir(folder_fd):
            if name.endswith(".sock"):
                poke_one(folder, folder_fd, name)
    finally:
        os.close(folder_fd)


def poke_one(folder: Path, folder_fd: int, name: str) -> None:
    try:
        sender().sendto(b"!", unix_path(folder, folder_fd, name))
    except BlockingIOError:
        pass  # its queue is full of pokes: the catch-up they cause covers this mail too
    except (ConnectionRefusedError, FileNotFoundError):
        try:
            os.unlink(name, dir_fd=folder_fd)
            log.info("removed the events socket %s of a process that is gone", name)
        except FileNotFoundError:
            pass
    except OSError as exc:
        log.warning("could not poke events socket %s: %s", name, exc.strerror)


# --------------------------------------------------------------------------
# listeners (one per process and database)

def start_listener(target: Hub, engine: Engine, listen_url: Optional[str] = None) -> None:
    """Start the listener for ``engine``'s database (on PostgreSQL through
    ``listen_url`` when set). Its set-up runs here, before the first waiter
    looks at the database, so no mail committed after that look can go
    unnoticed."""
    if engine.dialect.name == "postgresql":
        PgListener(target, make_url(listen_url) if listen_url else engine.url).start()
        return
    folder = events_folder(engine)
    if folder is not None:
        SocketListener(target, engine, folder).start()
    else:
        target.healthy = True  # one process: delivered() rings the hub directly


class SocketListener:
    """SQLite: a datagram socket in the database's events folder, and a
    cursor over message ids that says which mailboxes got mail."""

    def __init__(self, target: Hub, engine: Engine, folder: Path) -> None:
        # A connection of its own for each look, outside the request pool:
        # a wake-up must not queue behind the requests it is meant to wake.
        self.hub, self.engine, self.folder = target, create_engine(engine.url, poolclass=NullPool), folder
        self.sock: Optional[socket.socket] = None
        self.folder_fd = -1
        self.name = f"{os.getpid()}-{secrets.token_hex(4)}.sock"
        self.last_id = 0

    def start(self) -> None:
        try:
            self.bind()
            self.last_id = self.max_id()
        except OSError as exc:
            log.error("no new-mail events (socket in %s: %s); waiters re-check every second",
                      self.folder, exc.strerror)
            return
        self.hub.healthy = True
        atexit.register(self.close)
        threading.Thread(target=self.run, name="tempmail-events", daemon=True).start()

    def bind(self) -> None:
        self.folder.mkdir(mode=0o770, parents=True, exist_ok=True)
        self.folder_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(unix_path(self.folder, self.folder_fd, self.name))
        os.chmod(self.name, SOCKET_MODE, dir_fd=self.folder_fd)

    def max_id(self) -> int:
        with self.engine.connect() as conn:
            return conn.scalar(select(func.max(Message.id))) or 0

    def run(self) -> None:
        while True:
            try:
                self.sock.recv(64)
            except OSError:
                return  # closed at exit
            self.drain()
            try:
                self.catch_up()
            except Exception:  # noqa: BLE001 - a busy or broken database must not end the thread
                log.exception("new-mail catch-up failed; every waiter looks itself")
                self.hub.ring_all()

    def drain(self) -> None:
        """Swallow the pokes already queued: one catch-up answers them all.

        Non-blocking through the socket's mode, not ``MSG_DONTWAIT``: in a
        gevent web worker (fairaccept.py) a blocking socket's ``recv`` waits
        out EAGAIN whatever the flags, and this drain never ended."""
        self.sock.setblocking(False)
        try:
            while True:
                try:
                    self.sock.recv(64)
                except OSError:
                    return
        finally:
            try:
                self.sock.setblocking(True)
            except OSError:
                pass  # closed at exit meanwhile: run() ends at its next recv

    def catch_up(self) -> None:
        """Ring the mailboxes that got messages above the highest id seen."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(Message.mailbox_id, func.max(Message.id))
                                .where(Message.id > self.last_id).group_by(Message.mailbox_id)).all()
        if rows:
            self.last_id = max(top for _box, top in rows)
            self.hub.ring(box for box, _top in rows)

    def close(self) -> None:
        """At exit: delete this process's socket so no one pokes it again."""
        try:
            os.unlink(self.name, dir_fd=self.folder_fd)
        except OSError:
            pass
        if self.sock is not None:
            self.sock.close()


class PgListener:
    """PostgreSQL: one ``LISTEN`` connection of its own (autocommit, TCP
    keepalives so a dead link is noticed), reconnected when lost."""

    def __init__(self, target: Hub, url: URL) -> None:
        self.hub = target
        self.conninfo = url.set(drivername="postgresql").render_as_string(hide_password=False)
        self.conn = None

    def start(self) -> None:
        try:
            self.conn = self.connect()
            self.hub.healthy = True
        except Exception as exc:  # noqa: BLE001 - the thread keeps trying
            log.error("cannot LISTEN for new mail yet (%s); waiters re-check every second", exc)
        threading.Thread(target=self.run, name="tempmail-events", daemon=True).start()

    def connect(self):
        import psycopg  # only PostgreSQL installations need it loaded
        conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=10, keepalives=1,
                               keepalives_idle=10, keepalives_interval=5, keepalives_count=3,
                               application_name="tempmail-events")
        conn.execute(f"LISTEN {CHANNEL}")
        return conn

    def run(self) -> None:
        while True:
            if self.conn is None:
                self.reconnect()
            try:
                self.listen()
            except Exception as exc:  # noqa: BLE001 - psycopg.Error, OSError: reconnect
                log.warning("new-mail listener lost its connection (%s); reconnecting", exc)
                self.lost()

    def listen(self) -> None:
        """Ring the mailboxes each notification names; after 30 s of silence
        make sure the connection still works."""
        for note in self.conn.notifies(timeout=30):
            self.hub.ring(parse_ids(note.payload))
        self.conn.execute("SELECT 1")

    def lost(self) -> None:
        self.hub.healthy = False
        self.hub.ring_all()
        try:
            self.conn.close()
        except Exception:  # noqa: BLE001 - it is broken already
            pass
        self.conn = None

    def reconnect(self) -> None:
        """Connect again with back-off; then every waiter looks once, for
        the notifications sent while nobody listened."""
        pause, tries = 0.2, 0
        while self.conn is None:
            try:
                self.conn = self.connect()
            except Exception as exc:  # noqa: BLE001
                tries += 1
                if tries % 60 == 1:  # the first failure, then every five minutes or so
                    log.warning("new-mail listener cannot connect (%s); retrying", exc)
                time.sleep(pause)
                pause = min(pause * 2, 5.0)
        self.hub.healthy = True
        self.hub.ring_all()


def parse_ids(payload: str) -> list[int]:
    """Mailbox ids from a notification (anyone who may NOTIFY could send
    garbage: ignore what is not a short number)."""
    ids = []
    for part in (payload or "").split(",")[:PAYLOAD_IDS]:
        if part.isascii() and part.isdigit() and len(part) <= 18:
            ids.append(int(part))
    return ids
