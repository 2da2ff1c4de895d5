"""``flask storage migrate --to database|filesystem``: move an installation's
blobs from one storage backend to the other.

Idempotent per blob, so an interrupted run (Ctrl-C, a crash, a SIGKILL) is
resumed by running it again: each blob is copied, its bytes checked against
its name (the SHA-256), and only then does the copy count. A copy is never
seen half-made: chunk rows are committed in one transaction, a file is
written to a temporary name, synced and renamed.

Switching ``storage.backend`` is the operator's step, between two runs:

1. run it while mail keeps arriving (the old backend keeps storing);
2. set ``"storage": {"backend": "<target>"}`` on every host and restart them;
3. run it again: it copies what arrived between 1 and 2, and, now that the
   configuration names the target, removes the old copies.

Reads look in the other backend when the configured one lacks a blob
(``storage.location``), so no message is unreadable at any point.
"""
from __future__ import annotations

import hashlib
import itertools
import os
import sys
import uuid
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import click
from flask.cli import AppGroup
from sqlalchemy import bindparam, delete, func, select, update

import storage
import walsync
from models import Blob, BlobChunk, db

BACKENDS = ("database", "filesystem")
storage_cli = AppGroup("storage", help="Blob storage: move an installation between backends.")


@dataclass
class Report:
    """What a run did, blob by blob (counts, and the names of the troubled ones)."""
    copied: int = 0
    copied_bytes: int = 0
    present: int = 0
    removed: int = 0
    gone: int = 0
    missing: list = field(default_factory=list)
    corrupt: list = field(default_factory=list)

    def note(self, outcome: str, sha: str, size: int) -> None:
        if outcome == "copied":
            self.copied, self.copied_bytes = self.copied + 1, self.copied_bytes + size
        elif outcome in ("missing", "corrupt"):
            getattr(self, outcome).append(sha)
        else:
            setattr(self, outcome, getattr(self, outcome) + 1)


def migrate(target: str, batch_size: int = 500,
            progress: Optional[Callable[[int], None]] = None) -> Report:
    """Copy every blob into backend ``target``; when the configuration already
    names ``target``, also remove the copies left in the other backend."""
    if target not in BACKENDS:
        raise ValueError(f"unknown storage backend {target!r}")
    remove_source = storage.backend_name() == target
    report = Report()
    for sha, size in blob_rows(batch_size):
        dest = storage.home(target, size)  # small blobs stay rows under the filesystem backend too
        outcome = move_one(sha, dest)
        report.note(outcome, sha, size)
        if remove_source and outcome in ("copied", "present") and remove_copy(storage.other_backend(dest), sha):
            report.removed += 1
        if progress:
            progress(1)
    return report


def blob_rows(batch_size: int) -> Iterator[tuple[str, int]]:
    """(name, size) of every blob row, in name order, one short read per page:
    no transaction stays open while blobs are copied."""
    last = ""
    while True:
        rows = db.session.execute(select(Blob.sha256, Blob.size).where(Blob.sha256 > last)
                                  .order_by(Blob.sha256).limit(batch_size)).all()
        db.session.rollback()
        if not rows:
            return
        yield from ((sha, size or 0) for sha, size in rows)
        last = rows[-1][0]


def count_blobs() -> int:
    """How many blob rows there are (the progress bar's length)."""
    total = db.session.scalar(select(func.count(Blob.sha256))) or 0
    db.session.rollback()
    return int(total)


def move_one(sha: str, target: str) -> str:
    """Make sure ``target`` holds blob ``sha``: "present" (it already did),
    "copied", "missing" (no backend has it), "corrupt" (the source's bytes
    do not hash to the name: left alone, reported) or "gone" (deleted
    while this ran)."""
    if not storage.is_blob_name(sha):
        return "corrupt"
    if storage.holds(target, sha):
        return "present"
    if not storage.holds(storage.other_backend(target), sha):
        return "missing"
    return copy_to_database(sha) if target == "database" else copy_to_filesystem(sha)


# --------------------------------------------------------------------------
# into the database

def copy_to_database(sha: str) -> str:
    """Stream the file of ``sha`` into chunk rows, in one transaction that
    commits only when the bytes hash to the name."""
    table = Blob.__table__
    # Lock the blob row first (and on SQLite take the write lock): a deletion
    # of this blob waits for the copy, then removes the chunks with the row,
    # so no chunk can outlive its blob.
    locked = db.session.execute(update(table).where(table.c.sha256 == sha).values(refs=table.c.refs))
    if locked.rowcount == 0:
        db.session.rollback()
        return "gone"
    if storage.holds("database", sha):  # copied meanwhile by another run
        db.session.rollback()
        return "present"
    if file_chunks_to_rows(sha) != sha or rows_digest(sha) != sha:
        db.session.rollback()
        return "corrupt"
    db.session.commit()
    if storage.fsync_enabled():
        walsync.sync()
    return "copied"


def file_chunks_to_rows(sha: str) -> str:
    """INSERT the file's bytes as chunk rows; returns the SHA-256 of what was read."""
    hasher, insert = hashlib.sha256(), BlobChunk.__table__.insert()
    with open(storage.blob_path(sha), "rb") as fh:
        for seq in itertools.count():
            part = fh.read(storage.CHUNK)
            if not part and seq:
                break  # the size was a whole number of chunks
            hasher.update(part)
            db.session.execute(insert, {"sha256": sha, "seq": seq, "data": part})
            if len(part) < storage.CHUNK:
                break  # an empty blob is one empty chunk, as storage.insert_chunks makes it
    return hasher.hexdigest()


def rows_digest(sha: str) -> str:
    """SHA-256 of the chunk rows of ``sha`` as this transaction sees them:
    the copy is checked where it was written, not only as it was read."""
    hasher = hashlib.sha256()
    query = select(BlobChunk.data).where(BlobChunk.sha256 == sha, BlobChunk.seq == bindparam("seq"))
    seq = 0
    while (part := db.session.scalar(query, {"seq": seq})) is not None:
        hasher.update(part)
        seq += 1
    return hasher.hexdigest()


# --------------------------------------------------------------------------
# into the filesystem

def copy_to_filesystem(sha: str) -> str:
    """Write the chunk rows of ``sha`` to a temporary file, check its hash,
    sync it, and rename it to the blob's name."""
    path = storage.blob_path(sha)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{uuid.uuid4().hex}.tmp"
    try:
        written = rows_to_file(sha, tmp)
        if written != sha:
            tmp.unlink()
            return "gone" if not blob_row_exists(sha) else "corrupt"
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if storage.fsync_enabled():
        storage.sync_files([path])
    if not blob_row_exists(sha):  # deleted while copied: the file would be an orphan
        path.unlink(missing_ok=True)
        return "gone"
    return "copied"


def rows_to_file(sha: str, tmp) -> str:
    """Stream the chunk rows into ``tmp``; returns the SHA-256 of what was written."""
    hasher = hashlib.sha256()
    with open(tmp, "wb") as fh:
        for part in storage.stream_rows(db.engine, sha):
            hasher.update(part)
            fh.write(part)
        if storage.fsync_enabled():
            fh.flush()
            os.fsync(fh.fileno())
    return hasher.hexdigest()


def blob_row_exists(sha: str) -> bool:
    found = db.session.scalar(select(Blob.sha256).where(Blob.sha256 == sha)) is not None
    db.session.rollback()
    return found


# --------------------------------------------------------------------------
# the old copies

def remove_copy(backend: str, sha: str) -> bool:
    """Remove the copy of ``sha`` that ``backend`` (the one being left) still
    holds; True when there was one. Only called once the target's copy is
    checked and the configuration names the target."""
    if backend == "filesystem":
        try:
            storage.blob_path(sha).unlink()
            return True
        except FileNotFoundError:
            return False
    gone = db.session.execute(delete(BlobChunk).where(BlobChunk.sha256 == sha)).rowcount
    db.session.commit()
    return gone > 0


# --------------------------------------------------------------------------
# the command

@storage_cli.command("migrate")
@click.option("--to", "target", type=click.Choice(BACKENDS), required=True,
              help="The backend to move every blob into.")
@click.option("--batch-size", default=500, show_default=True, help="Blob rows read per query.")
def migrate_command(target: str, batch_size: int) -> None:
    """Copy every blob into the backend TARGET (resumable: run it again after
    an interruption); once the configuration names TARGET, also remove the
    old copies. Progress goes to stderr."""
    total = count_blobs()
    with click.progressbar(length=total, label=f"Copying {total} blobs to the {target}",
                           file=sys.stderr) as bar:
        report = migrate(target, batch_size, bar.update)
    print_report(report, target)
    if report.missing or report.corrupt:
        raise SystemExit(1)


def print_report(report: Report, target: str) -> None:
    """The run's figures, then exactly what the operator does next."""
    click.echo(f"copied {report.copied} blobs ({report.copied_bytes} bytes), {report.present} already "
               f"there, {report.gone} deleted meanwhile, {report.removed} old copies removed")
    for kind in ("missing", "corrupt"):
        names = getattr(report, kind)
        if names:
            shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
            click.echo(f"{len(names)} blobs {kind} (left as they are): {shown}", err=True)
    if storage.backend_name() != target:
        click.echo(f'Next: set "storage": {{"backend": "{target}"}} in config.json on every host '
                   f"and restart them (gunicorn, flask smtpd); then run "
                   f"'flask storage migrate --to {target}' again: it copies what arrived meanwhile "
                   f"and removes the old copies.")
    else:
        click.echo(f"storage.backend is already {target!r}: this installation is on the {target}.")
