"""Blob storage: raw messages and attachment bodies, each distinct blob once.

A blob is named by the SHA-256 of its bytes. The ``blobs`` table counts the
rows that use each one (``models.Blob``), in the same transaction as those
rows, so a message sent to 100 mailboxes, or an attachment mailed a thousand
times, is kept once and freed when its last user goes.

Two backends, chosen by ``storage.backend``:

* ``filesystem`` (default): files under ``uploads/blobs/ab/cd/<sha256>``,
  written before the rows that name them and made durable before the commit.
* ``database``: 1 MiB chunks in the ``blob_chunks`` table beside the rows,
  for hosts that share nothing but the database.

Durability (a 250 means the message survives a power loss): the filesystem
backend syncs its files before the commit that names them; the database
backend INSERTs a blob's chunks in the very transaction that commits the
rows naming it, so one durable COMMIT covers both (PostgreSQL with its
default ``synchronous_commit=on``; SQLite's WAL is fsynced after the commit,
``walsync.sync``, which also says what a failed sync means). A rollback takes the chunks with it.

Why ``bytea`` chunks and not PostgreSQL large objects: rows in an ordinary
table are deleted with their blob row in the same transaction (a large
object needs ``lo_unlink`` and leaks when forgotten, hence ``vacuumlo``),
work the same on SQLite, go through any connection pooler, are copied by
logical replication (``pg_largeobject`` is not), and stream just as well:
one 1 MiB row per read, the largest piece either side ever holds.

Reads look in the configured backend, then in the other one, so an
installation keeps serving every message while ``flask storage migrate``
(``storagemove.py``) moves it from one backend to the other.

No path is ever built from what a sender or client wrote: only hex digests.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

from flask import Response, current_app, send_file
from sqlalchemy import LargeBinary, bindparam, select, text

import database
import walsync
from models import Blob, BlobChunk, MessageSource, db

log = logging.getLogger("tempmail.storage")

CHUNK = 1 << 20
SYNCFS_MIN_FILES = 2  # from this many files on, one syncfs(2) beats an fsync per file and folder
SHA_HEX = frozenset("0123456789abcdef")


def digest(data: bytes) -> str:
    """The name of a blob: the hex SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()


def backend_name() -> str:
    return current_app.config["TEMPMAIL"]["storage"]["backend"]


def home(backend: str, size: int) -> str:
    """The backend that keeps a blob of ``size`` bytes when ``backend`` is
    configured. With the filesystem backend only blobs over
    ``storage.inline_max_bytes`` are files: a small blob is a row beside the
    message that names it, committed with it, so storing a small message
    creates and syncs no file (one WAL or PostgreSQL commit covers it;
    SQLite reads and writes blobs under ~100 KB faster in the database than
    as files). Reads look in both places either way."""
    inline_max = current_app.config["TEMPMAIL"]["storage"]["inline_max_bytes"]
    if backend == "filesystem" and inline_max > 0 and size <= inline_max:
        return "database"
    return backend


def in_file(size: int) -> bool:
    """Whether a new blob of ``size`` bytes is written as a file."""
    return home(backend_name(), size) == "filesystem"


def source_in_row(size: int) -> bool:
    """Whether a new message's raw bytes (``size`` of them) go in a row of
    their own (``models.MessageSource``) rather than a blob: when the
    configuration keeps a blob of that size in the database anyway, and it
    fits in one chunk. Only for a message stored once: one delivered to
    several mailboxes shares a blob (``mailhandler.store_copy``)."""
    return size <= CHUNK and home(backend_name(), size) == "database"


def fsync_enabled() -> bool:
    # Tests turn it off (FSYNC=False): a tmpfs-speed suite; production never does.
    return current_app.config.get("FSYNC", True)


# --------------------------------------------------------------------------
# staging blobs for a transaction

@dataclass
class PendingBlobs:
    """Blobs one transaction is about to reference: their bytes (until the
    commit is durable), how many new references each gets, and which files
    this transaction wrote (synced before the commit, removed on rollback)."""
    data: dict = field(default_factory=dict)
    refs: dict = field(default_factory=dict)
    written: list = field(default_factory=list)
    synced: int = 0

    def add(self, data: bytes, sha: Optional[str] = None) -> str:
        """Stage ``data`` (its SHA-256 may be given when already known); returns its name."""
        sha = sha or digest(data)
        self.refs[sha] = self.refs.get(sha, 0) + 1
        if sha not in self.data:
            self.data[sha] = data
            if in_file(len(data)):
                write_blob_file(sha, data, self)
        return sha

    def sync_files(self) -> None:
        """Make the files written so far durable (the daemon does this before
        its INSERTs, so the sync does not happen under SQLite's write lock)."""
        if fsync_enabled():
            sync_files(self.written[self.synced:])
        self.synced = len(self.written)

    def reference(self) -> None:
        """Count the staged references in the caller's transaction; the
        database backend also inserts the chunks of blobs new to it, in that
        same transaction: the commit that makes the rows durable makes their
        bytes durable too."""
        if not self.refs:
            return
        # One multi-row upsert for the whole batch, its rows sorted by name:
        # every transaction locks blob rows in the same order (``Blob.release``
        # too), so two batches sharing blobs on PostgreSQL wait for each other
        # instead of deadlocking.
        new = Blob.add_refs({sha: (len(self.data[sha]), count) for sha, count in self.refs.items()})
        insert_chunks_many((sha, self.data[sha]) for sha in sorted(new) if not in_file(len(self.data[sha])))

    def after_commit(self) -> None:
        """Once the rows are durable: every file they name must exist. A
        concurrent deletion may have freed a blob whose file this batch found
        already present (see ``discard``): write it again from memory."""
        for sha, data in self.data.items():
            if in_file(len(data)) and not blob_path(sha).exists():
                log.warning("blob %s vanished during its commit; written again", sha)
                write_blob_file(sha, data, self)
                self.sync_files()
                # The new row may itself have been deleted meanwhile (a deleter
                # that found no file to discard): then the file is an orphan.
                # A deletion committed after this look-up finds the file and
                # discards it itself.
                if db.session.scalar(select(Blob.sha256).where(Blob.sha256 == sha)) is None:
                    discard([sha])
        self.data.clear()

    def after_rollback(self) -> None:
        """A rolled-back store leaves no file it wrote behind (``discard`` keeps
        a file another row still uses)."""
        discard([p.name for p in self.written])
        self.written.clear()
        self.data.clear()


def insert_chunks_many(blobs: Iterable[tuple[str, bytes]]) -> None:
    """The rows of several blobs (``(sha, bytes)``) in one upsert: a batch
    of small messages costs one statement, not two per message. A blob over
    one chunk goes through ``insert_chunks``."""
    small = []
    for sha, data in blobs:
        if len(data) > CHUNK:
            insert_chunks(sha, data)
        else:
            small.append({"sha256": sha, "seq": 0, "data": data})
    if small:
        # Left-over rows under these names (see insert_chunks) hold the same
        # bytes: an upsert replaces them in the same statement, so a batch of
        # small messages costs one statement here, not a DELETE and an INSERT.
        database.run_in_parts(small, ("sha256", "seq", "data"), CHUNK_ROWS, upsert_chunk_rows)


# The daemon runs it for every batch. The same SQL on SQLite (3.24+) and PostgreSQL.
CHUNK_ROWS = 300  # rows per multi-row upsert: 900 parameters, below SQLite's limit


def upsert_chunk_rows(count: int):
    """UPSERT_CHUNK for ``count`` rows in one statement (run on the raw
    connection, compiled once per count: ``database.prepared``)."""
    rows = ", ".join(f"(:sha256_{i}, :seq_{i}, :data_{i})" for i in range(count))
    return text(f"INSERT INTO blob_chunks (sha256, seq, data) VALUES {rows} "
                "ON CONFLICT (sha256, seq) DO UPDATE SET data = excluded.data").bindparams(
        *(bindparam(f"data_{i}", type_=LargeBinary) for i in range(count)))


def insert_chunks(sha: str, data: bytes) -> None:
    """The database backend's copy of a blob, in 1 MiB rows, one INSERT each.

    Each row's value is a memoryview slice of the bytes the caller already
    holds: neither SQLite nor psycopg needs a ``bytes`` copy of it, so a
    25 MiB blob costs one chunk of driver buffer at a time, never a second
    whole copy (tests/test_storage.py measures it)."""
    table = BlobChunk.__table__
    # Rows left under this name without a ``blobs`` row (a migration copy
    # that raced the blob's deletion; the orphan sweep removes them too)
    # would collide with the new ones: same name, same bytes, so replace them.
    db.session.execute(table.delete().where(table.c.sha256 == sha))
    insert = table.insert()
    view = memoryview(data)
    for seq, start in enumerate(range(0, max(len(data), 1), CHUNK)):
        db.session.execute(insert, {"sha256": sha, "seq": seq, "data": view[start:start + CHUNK]})


# --------------------------------------------------------------------------
# the filesystem backend

def uploads_dir() -> Path:
    return Path(current_app.config["UPLOADS_DIR"])


def is_blob_name(name: str) -> bool:
    """True for a lower-case hex SHA-256: the only names blob files have."""
    return len(name) == 64 and SHA_HEX.issuperset(name)


def blob_path(sha: str) -> Path:
    """Where the file of blob ``sha`` lives; refuses anything but a hex digest."""
    if not is_blob_name(sha):
        raise ValueError("not a blob name")
    return uploads_dir() / "blobs" / sha[:2] / sha[2:4] / sha


def write_blob_file(sha: str, data: bytes, pending: PendingBlobs) -> None:
    """Write the file of ``sha`` unless it exists: to a temporary name, then
    renamed, so a file under a blob's name is always complete. The
    temporary file is removed on any failure (a full disk included)."""
    path = blob_path(sha)
    if path.exists():
        return
    tmp = path.parent / f"{uuid.uuid4().hex}.tmp"
    try:
        fh = open(tmp, "wb")
    except FileNotFoundError:  # the folder's first blob (or the purge removed it): a mkdir
        tmp.parent.mkdir(parents=True, exist_ok=True)  # per blob cost more than the write
        fh = open(tmp, "wb")
    try:
        with fh:
            fh.write(data)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    pending.written.append(path)


def discard(shas: Iterable[str]) -> None:
    """Remove the files of blobs whose last reference was deleted and committed.

    A delivery may, at this very moment, have found the file present and be
    committing a new reference to it. So the file is first renamed aside,
    then the ``blobs`` row is looked up again: if a reference came back, the
    file goes back too; the delivery itself re-checks after its commit
    (``PendingBlobs.after_commit``). Either way no committed row is left
    without its file.

    The database backend's chunks go with the rows; it still removes a file
    left by the filesystem backend (an installation moving between the two),
    which would otherwise stay forever: no blob row names it any more."""
    for sha in shas:
        try:
            path = blob_path(sha)
        except ValueError:
            continue
        aside = path.with_name(f"{sha}.{uuid.uuid4().hex}.gone")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue
        if db.session.scalar(select(Blob.sha256).where(Blob.sha256 == sha)) is not None:
            os.replace(aside, path)
        else:
            aside.unlink(missing_ok=True)
    db.session.rollback()  # end the read transaction the look-ups opened


def commit_removal(freed: list[str]) -> None:
    """Commit the caller's deletion, then free the blobs it released."""
    db.session.commit()
    discard(freed)


# --------------------------------------------------------------------------
# durability

def sync_files(paths: list[Path]) -> None:
    """fsync the given files and their folders, or one ``syncfs`` for many."""
    if not paths:
        return
    if len(paths) >= SYNCFS_MIN_FILES and syncfs(uploads_dir()):
        return
    folders = set()
    for path in paths:
        fsync_path(path)
        folders.update((path.parent, path.parent.parent, path.parent.parent.parent))
    for folder in folders:
        fsync_path(folder)


_syncfs = None


def syncfs(path: Path) -> bool:
    """``syncfs(2)`` on the filesystem holding ``path``: every dirty page of
    that filesystem reaches the disk in one call. False where unavailable."""
    global _syncfs
    if _syncfs is None:
        try:
            _syncfs = ctypes.CDLL(None, use_errno=True).syncfs
        except (OSError, AttributeError):  # not Linux / no glibc symbol
            _syncfs = False
    if not _syncfs:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        if _syncfs(fd) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"syncfs failed: {os.strerror(errno)}")
    finally:
        os.close(fd)
    return True


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit_durably(pending: PendingBlobs) -> None:
    """Sync the files, count the references, commit, and make the commit
    itself durable: once this returns, the rows and every blob they name
    survive a crash of the process and of the machine."""
    pending.sync_files()
    pending.reference()
    db.session.commit()
    if fsync_enabled():
        walsync.sync()  # NotDurable: the rows are committed, their files stay (discard keeps them)
    pending.after_commit()


# --------------------------------------------------------------------------
# reading

def other_backend(name: str) -> str:
    return "database" if name == "filesystem" else "filesystem"


def location(sha: Optional[str]) -> Optional[str]:
    """The backend that holds blob ``sha``: the configured one, else the other
    one (a blob ``flask storage migrate`` has not moved yet, so reads keep
    working while an installation changes backend), else None."""
    if not sha or not is_blob_name(sha):
        return None
    first = backend_name()
    for name in (first, other_backend(first)):
        if holds(name, sha):
            return name
    return None


def holds(name: str, sha: str) -> bool:
    """True when backend ``name`` has a complete copy of blob ``sha``: a file
    under its name (only ever renamed into place whole), or its chunk rows
    (only ever committed all together)."""
    if name == "database":
        return db.session.scalar(select(BlobChunk.seq).where(BlobChunk.sha256 == sha).limit(1)) is not None
    return blob_path(sha).is_file()


def exists(sha: Optional[str]) -> bool:
    """True when the bytes of blob ``sha`` can be read."""
    return location(sha) is not None


def iter_chunks(sha: str) -> Iterator[bytes]:
    """The bytes of blob ``sha`` in chunks; memory stays one chunk whatever its size."""
    if location(sha) == "database":
        yield from stream_rows(db.engine, sha)
        return
    with open(blob_path(sha), "rb") as fh:
        while part := fh.read(CHUNK):
            yield part


def stream_rows(engine, sha: str) -> Iterator[bytes]:
    """The chunk rows of ``sha``, one short read each on a connection taken
    from ``engine``'s pool and given back at once.

    It needs neither the app context nor the request's session, so it works
    inside a streamed response (which runs after the view returned), and a
    slow client holds no connection and no open transaction between chunks.
    A blob deleted while it streams ends the stream early: the client sees
    fewer bytes than the Content-Length announced."""
    query = select(BlobChunk.data).where(BlobChunk.sha256 == sha, BlobChunk.seq == bindparam("seq"))
    seq = 0
    while True:
        with engine.connect() as conn:
            part = conn.scalar(query, {"seq": seq})
        if part is None:
            return
        yield bytes(part)
        seq += 1


def read(sha: str) -> bytes:
    """The whole blob (for re-parsing; downloads stream with ``download``)."""
    return b"".join(iter_chunks(sha))


def download(sha: Optional[str], mimetype: str, name: str) -> Optional[Response]:
    """A blob as a download that no browser renders inline or sniffs; None
    when it is gone, so each caller answers in its own error shape."""
    where = location(sha)
    if where is None:
        return None
    if where == "filesystem":
        resp = send_file(blob_path(sha), mimetype=mimetype, as_attachment=True, download_name=name,
                         max_age=0)
        return guarded(resp)
    resp = Response(stream_rows(db.engine, sha), mimetype=mimetype)
    size = db.session.scalar(select(Blob.size).where(Blob.sha256 == sha))
    if size is not None:
        resp.content_length = size  # lets the client notice a stream cut short
    return as_download(resp, name)


def as_download(resp: Response, name: str) -> Response:
    """``resp`` as an attachment named ``name``, revalidated, never rendered."""
    resp.headers.set("Content-Disposition", "attachment", filename=name)
    resp.headers["Cache-Control"] = "no-cache"
    return guarded(resp)


def guarded(resp: Response) -> Response:
    """``resp`` never sniffed, rendered or scripted by the browser, whatever its bytes."""
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Content-Security-Policy"] = "default-src 'none'; sandbox"
    return resp


# --------------------------------------------------------------------------
# a message's raw bytes: its own row (MessageSource), else its blob

def own_source(msg_id: int) -> Optional[bytes]:
    """The raw bytes kept in the message's own row, or None."""
    data = db.session.scalar(select(MessageSource.data).where(MessageSource.message_id == msg_id))
    return bytes(data) if data is not None else None


def source_chunks(msg) -> Optional[Iterator[bytes]]:
    """The message ``msg`` exactly as received, in pieces; None when gone."""
    data = own_source(msg.id)
    if data is not None:
        return iter((data,))
    return iter_chunks(msg.raw_sha256) if exists(msg.raw_sha256) else None


def read_source(msg) -> Optional[bytes]:
    """The whole message ``msg`` as received (for re-parsing); None when gone."""
    chunks = source_chunks(msg)
    return b"".join(chunks) if chunks is not None else None


def download_attachment(att) -> Optional[Response]:
    """The attachment ``att`` as a download (``download``): its blob, or its
    span of its message's own row; None when gone."""
    mimetype, name = att.content_type or "application/octet-stream", att.filename or "attachment"
    if not att.in_source:
        return download(att.sha256, mimetype, name)
    data = read_attachment(att)
    return as_download(Response(data, mimetype=mimetype), name) if data is not None else None


def read_attachment(att) -> Optional[bytes]:
    """The attachment ``att``'s bytes; None when gone."""
    if not att.in_source:
        return read(att.sha256) if exists(att.sha256) else None
    raw = own_source(att.message_id)
    return att.bytes_in(raw) if raw is not None else None


def download_source(msg, name: str) -> Optional[Response]:
    """The message ``msg`` as received, as a ``message/rfc822`` download; None when gone."""
    data = own_source(msg.id)
    if data is None:
        return download(msg.raw_sha256, "message/rfc822", name)
    return as_download(Response(data, mimetype="message/rfc822"), name)


# --------------------------------------------------------------------------
# room to store

def min_free_bytes() -> int:
    """The free-space floor: ``storage.min_free_bytes``, by default four
    times the largest message (a raw copy plus decoded parts, with margin)."""
    conf = current_app.config["TEMPMAIL"]
    floor = conf["storage"]["min_free_bytes"]
    return int(floor) if floor is not None else 4 * int(conf["max_message_bytes"])


def storage_folder() -> Optional[Path]:
    """The folder whose filesystem fills up as mail is stored, or None when
    that is another host's (the database backend on a server database)."""
    if backend_name() == "filesystem":
        return uploads_dir()
    path = database.sqlite_file(db.engine.url)
    return Path(path).parent if path else None


def has_room(max_age: float = 1.0) -> bool:
    """False while the storage filesystem has less free space than the floor.
    Looked up at most once every ``max_age`` seconds per app and process: the
    daemon asks on every MAIL and RCPT command, so a fresh answer is found
    before any path is built from the configuration."""
    cached = current_app.extensions.setdefault("tempmail_room", [float("-inf"), True])  # [when, answer]
    now = time.monotonic()
    if now - cached[0] > max_age:
        folder = storage_folder()
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
        cached[:] = [now, folder is None or shutil.disk_usage(folder).free >= min_free_bytes()]
    return cached[1]
