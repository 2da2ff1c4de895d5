"""Retention: what TempMail deletes, and the checks that nothing is orphaned.

* expired mailboxes with their messages and blobs (``purge_expired``),
* messages over ``max_messages_per_mailbox`` (``trim_mailbox`` at delivery,
  ``trim_all_mailboxes`` for a lowered cap),
* blobs no row uses any more (``remove_orphans``) and rows whose blob is
  gone (``find_missing``),

each in bounded transactions, so a mailbox of 100,000 messages never becomes
one huge transaction and mail arriving meanwhile waits for one batch at most.
``run_purge`` is the whole pass, for ``flask purge`` and the daemon's timer.
"""
from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

from sqlalchemy import delete, func, select

import clock
import metrics
import storage
import webhooks
from models import (OWN_SOURCE, ApiKey, Attachment, Blob, BlobChunk, Domain, Mailbox, Message, Stat, User,
                    cfg, db, delete_message_rows)

log = logging.getLogger("tempmail.retention")
Progress = Optional[Callable[[int], None]]


def purge_expired(batch_size: int = 500, progress: Progress = None) -> dict:
    """Delete expired mailboxes with their messages and blobs; returns
    ``{"mailboxes": n, "messages": n}``. First at most ``batch_size`` messages
    of expired mailboxes per transaction, then at most ``batch_size`` (by then
    empty) mailboxes. The cutoff is taken once: what expires while the purge
    runs is left for the next run. ``progress(n)`` gets the rows of each batch."""
    cutoff = clock.now()
    totals = {"mailboxes": 0, "messages": 0}
    expired = select(Mailbox.id).where(Mailbox.expires_at <= cutoff)
    while True:
        # SKIP LOCKED (PostgreSQL; SQLite has one writer anyway): purges running
        # at once on several hosts each take batches the others are not
        # deleting, instead of queueing behind the same rows.
        ids = list(db.session.scalars(select(Message.id).where(Message.mailbox_id.in_(expired))
                                      .order_by(Message.id).limit(batch_size)
                                      .with_for_update(skip_locked=True)))
        if ids:  # n: the rows this purge deleted, not the ones another purge got first
            (n, freed), kind = delete_message_rows(ids), "messages"
        else:
            n, freed, kind = _delete_empty_mailboxes(cutoff, batch_size), [], "mailboxes"
            if n == 0:
                db.session.rollback()
                return totals
        storage.commit_removal(freed)
        totals[kind] += n
        if progress:
            progress(n)


def _delete_empty_mailboxes(cutoff: datetime, limit: int) -> int:
    # NOT EXISTS is checked again by the DELETE itself: a message stored after
    # the messages pass keeps its mailbox for the next round, so the foreign
    # key's cascade can never drop a message row while keeping its blobs' refs.
    empty = (Mailbox.expires_at <= cutoff,
             ~select(Message.id).where(Message.mailbox_id == Mailbox.id).exists())
    ids = list(db.session.scalars(select(Mailbox.id).where(*empty).limit(limit)))
    if not ids:
        return 0
    return db.session.execute(delete(Mailbox).where(Mailbox.id.in_(ids), *empty)).rowcount


def count_expired() -> dict:
    """How many mailboxes and messages ``purge_expired`` would remove now."""
    expired = select(Mailbox.id).where(Mailbox.expires_at <= clock.now())
    boxes = db.session.scalar(select(func.count()).select_from(expired.subquery())) or 0
    msgs = db.session.scalar(select(func.count(Message.id)).where(Message.mailbox_id.in_(expired))) or 0
    return {"mailboxes": boxes, "messages": msgs}


def max_messages_per_mailbox() -> int:
    """The configured retention cap per mailbox; 0 means no cap."""
    return max(0, int(cfg("max_messages_per_mailbox") or 0))


class Trimmed(NamedTuple):
    """What ``trim_mailbox`` removed: how many messages, and the blobs freed."""
    count: int
    freed: list


def trim_mailbox(mailbox_id: int, keep: Optional[int] = None, batch_size: int = 500) -> Trimmed:
    """Delete the oldest messages of one mailbox beyond the newest ``keep``
    (default: ``max_messages_per_mailbox``; 0 = no cap), at most
    ``batch_size`` of them, in the caller's transaction. Delivery calls it
    before its commit, so a mailbox never holds more than the cap once a
    delivery is durable."""
    keep = max_messages_per_mailbox() if keep is None else keep
    ids = _overflow(mailbox_id, keep, batch_size) if keep > 0 else []
    return Trimmed(*delete_message_rows(ids))


def _overflow(mailbox_id: int, keep: int, batch_size: int) -> list[int]:
    db.session.flush()  # count a message just added in this transaction
    return list(db.session.scalars(select(Message.id).where(Message.mailbox_id == mailbox_id)
                                   .order_by(Message.id.desc()).offset(keep).limit(batch_size)))


def trim_all_mailboxes(batch_size: int = 500, progress: Progress = None) -> int:
    """Apply the retention cap to every mailbox, one bounded commit at a time
    (the cap may have been lowered, or mail stored by an older release)."""
    keep, removed = max_messages_per_mailbox(), 0
    if keep <= 0:
        return 0
    while True:
        over = list(db.session.scalars(select(Message.mailbox_id).group_by(Message.mailbox_id)
                                       .having(func.count(Message.id) > keep).limit(batch_size)))
        if not over:
            return removed
        for box_id in over:
            n, freed = trim_mailbox(box_id, keep, batch_size)
            storage.commit_removal(freed)
            removed += n
            if progress:
                progress(n)


# --------------------------------------------------------------------------
# orphans: blobs without rows, rows without blobs

def _stored_files(grace_seconds: float) -> Iterator[tuple[str, Path]]:
    """(relative name, path) of every file in the uploads folder older than
    ``grace_seconds``; dot-files (``.htaccess``, ``.gitkeep``) are not
    TempMail's to manage."""
    root = storage.uploads_dir()
    limit = time.time() - grace_seconds
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(folder) / name
            try:
                if not name.startswith(".") and path.stat().st_mtime < limit:
                    yield path.relative_to(root).as_posix(), path
            except FileNotFoundError:
                continue


def remove_orphans(grace_seconds: float = 3600, batch_size: int = 500) -> list[str]:
    """Delete stored bytes no ``blobs`` row names (files; chunks of the
    database backend go with their rows) and blob rows nothing uses any
    more; returns the names removed. Files younger than ``grace_seconds``
    are never touched: a receiver writes a blob's file before the rows that
    name it, and a ``.tmp`` file may be one being written right now."""
    removed: list[str] = []
    chunk: dict[str, tuple[str, Path]] = {}
    for rel, path in _stored_files(grace_seconds):
        if not storage.is_blob_name(path.name):  # .tmp / .gone left by a crash, strays
            path.unlink(missing_ok=True)
            removed.append(rel)
            continue
        chunk[path.name] = (rel, path)
        if len(chunk) >= batch_size:
            removed += _unlink_unreferenced(chunk)
            chunk = {}
    removed += _unlink_unreferenced(chunk)
    removed += _drop_unused_blob_rows(batch_size)
    _remove_empty_folders(grace_seconds)
    return removed


def _unlink_unreferenced(chunk: dict[str, tuple[str, Path]]) -> list[str]:
    if not chunk:
        return []
    used = set(db.session.scalars(select(Blob.sha256).where(Blob.sha256.in_(list(chunk)))))
    gone = [sha for sha in chunk if sha not in used]
    db.session.rollback()
    storage.discard(gone)  # the same re-checked removal as a deletion uses
    return [chunk[sha][0] for sha in gone]


def _drop_unused_blob_rows(batch_size: int) -> list[str]:
    """Blob rows whose users vanished without releasing them (an expired
    mailbox re-claimed by a new one, a crash between two transactions)."""
    used_raw = select(Message.id).where(Message.raw_sha256 == Blob.sha256, ~OWN_SOURCE).exists()
    used_att = select(Attachment.id).where(Attachment.sha256 == Blob.sha256).exists()
    names = list(db.session.scalars(select(Blob.sha256).where(~used_raw, ~used_att).limit(batch_size)))
    if names:
        # Only the rows this DELETE removed lose their chunks: one that a
        # delivery used meanwhile stays whole.
        names = list(db.session.scalars(delete(Blob).where(Blob.sha256.in_(names), ~used_raw, ~used_att)
                                        .returning(Blob.sha256)))
        if names:
            db.session.execute(delete(BlobChunk).where(BlobChunk.sha256.in_(names)))
    storage.commit_removal(names)
    return names + _drop_orphan_chunks(batch_size)


def _drop_orphan_chunks(batch_size: int) -> list[str]:
    """Chunk rows of the database backend that no ``blobs`` row names (left
    by a ``flask storage migrate`` copy racing the blob's deletion)."""
    known = select(Blob.sha256).where(Blob.sha256 == BlobChunk.sha256).exists()
    names = list(db.session.scalars(select(BlobChunk.sha256).where(~known).distinct().limit(batch_size)))
    if names:
        db.session.execute(delete(BlobChunk).where(BlobChunk.sha256.in_(names), ~known))
    db.session.commit()
    return [f"chunks/{sha}" for sha in names]


def _remove_empty_folders(grace_seconds: float) -> None:
    # Only folders left alone for the grace period: a receiver may have just
    # created one and be about to write into it.
    limit = time.time() - grace_seconds
    root = storage.uploads_dir()
    for folder, _dirs, files in os.walk(root, topdown=False):
        path = Path(folder)
        try:
            if path != root and not files and not any(path.iterdir()) and path.stat().st_mtime < limit:
                path.rmdir()
        except OSError:
            continue


def find_missing(batch_size: int = 500) -> dict:
    """Rows whose blob bytes are gone: ``{"messages": [ids], "attachments": [ids]}``.
    Only reported (such a message still shows its parsed text); never raises."""
    # A message whose bytes are in its own row has no blob to miss, nor an
    # attachment kept as a span of them.
    return {"messages": _missing(Message.id, Message.raw_sha256, batch_size, ~OWN_SOURCE),
            "attachments": _missing(Attachment.id, Attachment.sha256, batch_size,
                                    ~Attachment.in_source)}


def _missing(id_col, sha_col, batch_size: int, *where) -> list[int]:
    missing, last = [], 0
    while True:
        rows = db.session.execute(select(id_col, sha_col).where(id_col > last, sha_col.is_not(None), *where)
                                  .order_by(id_col).limit(batch_size)).all()
        if not rows:
            return missing
        missing += [row_id for row_id, sha in rows if not storage.exists(sha)]
        last = rows[-1][0]


# --------------------------------------------------------------------------
# the whole pass, and what is stored

def run_purge(batch_size: int = 500, grace_seconds: float = 3600, orphans: bool = True,
              progress: Progress = None, trim: bool = True) -> dict:
    """One full retention pass, as ``flask purge`` and the mail daemon's timer
    run it: expired mailboxes, the per-mailbox cap, then orphans. The
    daemon's timer passes ``trim=False``: delivery caps each mailbox as it
    stores, so a scan of every mailbox each minute would be wasted work."""
    result = purge_expired(batch_size, progress)
    result["trimmed"] = trim_all_mailboxes(batch_size) if trim else 0
    result["orphan_files"] = remove_orphans(grace_seconds, batch_size) if orphans else []
    result["missing"] = find_missing(batch_size) if orphans else {}
    result["webhook_events"] = webhooks.purge_outbox(batch_size)
    metrics.PURGE_RUNS.inc()
    for kind in ("mailboxes", "messages", "trimmed"):
        metrics.PURGE_ROWS.labels(kind=kind).inc(result[kind])
    metrics.PURGE_ROWS.labels(kind="orphan_files").inc(len(result["orphan_files"]))
    log.info("purge: %d mailboxes, %d messages, %d over the cap, %d orphans",
             result["mailboxes"], result["messages"], result["trimmed"], len(result["orphan_files"]))
    return result


def storage_stats() -> dict:
    """Counts for ``flask stats`` and the metrics gauges: rows per table, bytes
    stored (each distinct blob once, plus the raw messages in rows of their
    own), lifetime counters."""
    def count(stmt) -> int:
        return int(db.session.scalar(stmt) or 0)
    t = clock.now()
    stat = db.session.get(Stat, 1)
    blob_bytes = count(select(func.sum(Blob.size)))
    # Raw messages kept in rows of their own are no blobs (nor are their
    # attachments, spans of them): counted from their size, a column of the row.
    source_bytes = count(select(func.sum(Message.size)).where(OWN_SOURCE))
    return {
        "domains": count(select(func.count(Domain.id))),
        "mailboxes_live": count(select(func.count(Mailbox.id)).where(Mailbox.expires_at > t)),
        "mailboxes_expired": count(select(func.count(Mailbox.id)).where(Mailbox.expires_at <= t)),
        "messages": count(select(func.count(Message.id))),
        "message_bytes": count(select(func.sum(Message.size))),
        "attachments": count(select(func.count(Attachment.id))),
        "attachment_bytes": count(select(func.sum(Attachment.size))),
        "blobs": count(select(func.count(Blob.sha256))),
        "blob_bytes": blob_bytes,
        "source_bytes": source_bytes,
        "stored_bytes": blob_bytes + source_bytes,
        "users": count(select(func.count(User.id))),
        "api_keys_live": count(select(func.count(ApiKey.id)).where(ApiKey.revoked_at.is_(None))),
        "total_received": stat.total_received if stat else 0,
        "total_addresses": stat.total_addresses if stat else 0,
    }
