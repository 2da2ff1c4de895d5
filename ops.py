"""Operations: health check, Prometheus metrics, schema migrations and the
maintenance commands (``flask purge``, ``stats``, ``reparse``, ``import``).

``/metrics`` answers clients on this machine (loopback) only, unless
``metrics.token`` is set: then anyone with the token, and no one without.
Metrics are per process by default. Set ``PROMETHEUS_MULTIPROC_DIR`` to an
empty folder shared by the gunicorn workers and the mail daemon (see
``deploy/gunicorn.conf.py``) and ``/metrics`` adds up every process instead.
"""
from __future__ import annotations

import fcntl
import hmac
import ipaddress
import json
import logging
import mailbox as mboxlib
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from collections import Counter
from typing import Iterator

import click
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from flask import Blueprint, Flask, Response, abort, jsonify, request
from flask.cli import with_appcontext
from flask_migrate import Migrate
from flask_migrate import upgrade as migrate_upgrade
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import SQLAlchemyError

import mailhandler
import metrics
import models
import retention
import storage
from models import Blob, Mailbox, Message, db

ROOT = Path(__file__).resolve().parent
MIGRATIONS_DIR = ROOT / "migrations"
# The revision whose schema ``db.create_all()`` produced before migrations
# existed: a database with tables but no alembic_version is stamped with it.
BASELINE_REVISION = "0001"
SCHEMA_LOCK_KEY = 0x7E3D_A11  # any constant; names TempMail's advisory lock in PostgreSQL

log = logging.getLogger("tempmail.ops")
bp = Blueprint("ops", __name__)
migrate = Migrate()


# --------------------------------------------------------------------------
# metrics

def _record_request(response: Response) -> Response:
    rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
    metrics.count_request(rule, request.method, str(response.status_code))
    return response


class DatabaseCollector:
    """Gauges read from the database at scrape time, so every process reports
    the same figures however the work was spread."""

    def collect(self):
        stats = retention.storage_stats()
        for key, help_ in (("mailboxes_live", "Mailboxes not yet expired."),
                           ("mailboxes_expired", "Expired mailboxes waiting for the purge."),
                           ("messages", "Messages stored now."),
                           ("message_bytes", "Bytes of raw messages stored now."),
                           ("stored_bytes", "Bytes the store holds now: each distinct blob once, "
                                            "and the raw messages kept in rows of their own.")):
            yield GaugeMetricFamily(f"tempmail_{key}", help_, value=stats[key])


def metrics_text() -> bytes:
    """The exposition: this process's (or every process's) counters, then the database gauges."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    gauges = CollectorRegistry(auto_describe=False)
    gauges.register(DatabaseCollector())
    return generate_latest(registry) + generate_latest(gauges)


def metrics_settings() -> dict:
    """``metrics`` from the configuration: ``enabled`` (default true), ``token`` (default none)."""
    conf = models.cfg("metrics")
    return {"enabled": bool(conf["enabled"]), "token": conf["token"] or None}


# Headers a reverse proxy adds: with one of them on a request from 127.0.0.1
# while ``behind_proxy`` is off, the real client is elsewhere.
FORWARDING_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")


def from_this_machine() -> bool:
    """True when the client is a loopback address. Behind a proxy that
    ``behind_proxy`` does not declare, every request seems to come from the
    proxy's 127.0.0.1: a request carrying forwarding headers then counts as remote."""
    try:
        addr = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        return False
    addr = getattr(addr, "ipv4_mapped", None) or addr  # ::ffff:127.0.0.1 is loopback too
    if not addr.is_loopback:
        return False
    return bool(models.cfg("behind_proxy")) or not any(h in request.headers for h in FORWARDING_HEADERS)


@bp.get("/metrics", endpoint="metrics")
def metrics_view():
    """The scrape: for the configured token, else for loopback clients only
    (each scrape runs COUNT/SUM queries over whole tables)."""
    settings = metrics_settings()
    if not settings["enabled"]:
        abort(404)
    if settings["token"]:
        given = request.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(given.encode(), settings["token"].encode()):
            return Response("metrics token required\n", 401, {"WWW-Authenticate": "Bearer"},
                            mimetype="text/plain")
    elif not from_this_machine():
        return Response("metrics are served to this machine only; set metrics.token to scrape "
                        "from elsewhere\n", 403, mimetype="text/plain")
    return Response(metrics_text(), headers={"Content-Type": CONTENT_TYPE_LATEST,
                                             "Cache-Control": "no-store"})


# --------------------------------------------------------------------------
# health

def check_database() -> str:
    """``ok``, or the error's class name (details go to the log, not to the world)."""
    try:
        db.session.execute(text("SELECT 1"))
        return "ok"
    except SQLAlchemyError as exc:
        db.session.rollback()
        log.error("health check: database unreachable: %s", exc)
        return f"error: {type(exc).__name__}"


def check_uploads() -> str:
    """``ok`` when a file can really be created where blobs are stored (a bare
    permission check would pass for root and miss a stale network mount),
    ``full`` below the free-space floor (``storage.min_free_bytes``), when
    the daemon answers 452 and senders keep their mail queued."""
    folder = storage.storage_folder()
    try:
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)  # as the first stored file would
            with tempfile.TemporaryFile(dir=folder):
                pass
        return "ok" if storage.has_room(max_age=0) else "full"
    except OSError as exc:
        log.error("health check: storage folder not writable: %s", exc)
        return f"error: {type(exc).__name__}"


@bp.get("/healthz")
def healthz():
    checks = {"database": check_database(), "uploads": check_uploads()}
    healthy = all(v == "ok" for v in checks.values())
    resp = jsonify(status="ok" if healthy else "fail", **checks)
    resp.headers["Cache-Control"] = "no-store"
    return resp, 200 if healthy else 503


# --------------------------------------------------------------------------
# schema: create_all on first start and Alembic migrations agree

@contextmanager
def schema_lock(conn) -> Iterator[None]:
    """Serialise schema set-up between processes starting together (gunicorn
    workers, the mail daemon): an advisory lock in PostgreSQL, held until the
    transaction ends; a lock file next to a SQLite database."""
    name = conn.dialect.name
    path = conn.engine.url.database if name == "sqlite" else None
    if name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        yield
    elif path and path != ":memory:":
        with open(f"{path}.schema-lock", "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            yield
    else:
        yield


def prepare_database(upgrade: bool = False) -> str:
    """Make the schema usable and tell how: ``created`` (empty database:
    ``create_all`` and stamped with the newest revision), ``stamped`` (tables
    from before migrations existed: stamped with the baseline), ``upgraded``,
    ``current`` or ``behind`` (older revision and ``upgrade`` false: logged)."""
    script = ScriptDirectory(str(MIGRATIONS_DIR))
    with db.engine.connect() as conn, schema_lock(conn):
        tables = set(inspect(conn).get_table_names())
        context = MigrationContext.configure(conn)
        if not tables & set(db.metadata.tables):
            db.metadata.create_all(conn)
            context.stamp(script, "heads")
            state = "created"
        elif "alembic_version" not in tables or not context.get_current_heads():
            if script.get_current_head() == BASELINE_REVISION:
                # a pre-migration database of this very schema may miss a table
                # added late in the release; once newer revisions exist, they add it
                db.metadata.create_all(conn)
            context.stamp(script, BASELINE_REVISION)
            state = "stamped"
        else:
            state = "current"
        conn.commit()
        behind = set(context.get_current_heads()) != set(script.get_heads())
    if behind and upgrade:
        migrate_upgrade(directory=str(MIGRATIONS_DIR))
        return "upgraded"
    if behind:
        log.warning("database schema is older than this release: run `flask db upgrade`")
        return "behind"
    return state


# --------------------------------------------------------------------------
# commands

def counted(count: int, singular: str, plural: str | None = None) -> str:
    """``"1 message"``, ``"2 messages"``: a count with its noun in the right number,
    for the commands' summaries (``plural`` defaults to ``singular + "s"``)."""
    return f"{count} {singular if count == 1 else plural or singular + 's'}"


def _bar(length: int, label: str, hidden: bool = False):
    # stderr: a cron job's stdout then carries only the summary lines
    return click.progressbar(length=length, label=label, file=sys.stderr, hidden=hidden)


@click.command("purge")
@with_appcontext
@click.option("--batch-size", type=click.IntRange(1, 100_000), default=500, show_default=True,
              help="Rows per transaction.")
@click.option("--grace", "grace_seconds", type=click.IntRange(0), default=3600, show_default=True,
              help="Unreferenced files younger than this many seconds are left alone.")
@click.option("--no-orphans", is_flag=True, help="Skip the orphaned-file sweep.")
@click.option("--quiet", is_flag=True, help="Print warnings only (for cron, which mails any output).")
def purge_command(batch_size: int, grace_seconds: int, no_orphans: bool, quiet: bool) -> None:
    """Delete expired mailboxes, messages over the cap and orphaned files."""
    todo = retention.count_expired()
    with _bar(todo["mailboxes"] + todo["messages"], "Purging expired mail", hidden=quiet) as bar:
        result = retention.run_purge(batch_size, grace_seconds, not no_orphans, bar.update)
    cap = retention.max_messages_per_mailbox()
    if not quiet:
        click.echo(f"Removed {counted(result['mailboxes'], 'expired mailbox', 'expired mailboxes')}"
                   f" and {counted(result['messages'], 'message')}.")
        click.echo(f"Removed {counted(result['trimmed'], 'message')} over the cap of {cap} per mailbox."
                   if cap else "No per-mailbox cap configured (max_messages_per_mailbox).")
        if not no_orphans:
            click.echo(f"Removed {counted(len(result['orphan_files']), 'orphaned file')}.")
    if not no_orphans:
        for kind, ids in result["missing"].items():
            if ids:
                shown = ", ".join(map(str, ids[:20])) + (" ..." if len(ids) > 20 else "")
                # kind is "messages" or "attachments": regular plurals
                click.echo(f"Warning: {counted(len(ids), kind.removesuffix('s'))} whose stored file "
                           f"is gone (ids {shown}).")


@click.command("stats")
@with_appcontext
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def stats_command(as_json: bool) -> None:
    """Show what the database and the uploads folder hold."""
    stats = retention.storage_stats()
    if as_json:
        click.echo(json.dumps(stats))
        return
    width = max(map(len, stats))
    for key, value in stats.items():
        click.echo(f"{key.replace('_', ' '):<{width}}  {value}")


@click.command("reparse")
@with_appcontext
@click.option("--id", "ids", type=click.IntRange(1), multiple=True,
              help="Only this message id (repeatable); default every message.")
def reparse_command(ids: tuple[int, ...]) -> None:
    """Parse the stored raw .eml of messages again and refresh their fields and attachments."""
    parse = mailhandler.parse_message
    total = len(ids) or (db.session.scalar(select(func.count(Message.id))) or 0)
    done, skipped = 0, []
    with _bar(total, "Re-parsing messages") as bar:
        for msg_id in ids or message_ids():
            skipped += [] if _reparse_one(msg_id, parse) else [msg_id]
            done += 1
            bar.update(1)
    click.echo(f"Re-parsed {counted(done - len(skipped), 'message')}.")
    if skipped:
        click.echo(f"Skipped {len(skipped)} (missing message or raw file): ids "
                   + ", ".join(map(str, skipped[:20])))


def message_ids(batch_size: int = 500) -> Iterator[int]:
    """Every message id in ascending order, read in keyset batches (bounded memory)."""
    last = 0
    while True:
        ids = list(db.session.scalars(select(Message.id).where(Message.id > last)
                                      .order_by(Message.id).limit(batch_size)))
        if not ids:
            return
        yield from ids
        last = ids[-1]


REPARSED_FIELDS = ("from_email", "from_name", "to", "cc", "subject", "date", "message_id",
                   "body_text", "body_html")


def _reparse_one(msg_id: int, parse) -> bool:
    """Replace one message's header and body fields and its attachments with
    a fresh parse of its raw blob, in one transaction of its own (a failure
    keeps the others). Envelope, read flag and ids stay."""
    msg = db.session.get(Message, msg_id)
    if msg is None:
        return False
    own = storage.own_source(msg.id)  # read once: the bytes, and whether spans can point into them
    raw = own if own is not None else storage.read_source(msg)
    if raw is None:
        return False
    parsed = parse(raw)
    for key in REPARSED_FIELDS:
        setattr(msg, key, parsed[key])
    msg.revision = (msg.revision or 0) + 1  # what a web worker kept of it is stale now
    pending = storage.PendingBlobs()
    freed = Blob.release(Counter(a.sha256 for a in msg.attachments if not a.in_source))
    msg.attachments.clear()  # delete-orphan: the old rows go at flush
    msg.attachments.extend(mailhandler.attachment_rows(parsed["attachments"], pending,
                                                       in_source=own is not None, raw=raw))
    storage.commit_durably(pending)
    storage.discard(freed)
    return True


def _sources(path: Path) -> tuple[int, Iterator[bytes]]:
    """How many messages ``path`` holds and an iterator over their raw bytes:
    a folder of ``*.eml`` files (recursively, sorted), an mbox file, or one message."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.eml") if p.is_file())
        return len(files), (p.read_bytes() for p in files)
    with open(path, "rb") as fh:
        is_mbox = fh.read(5) == b"From "
    if not is_mbox:
        return 1, iter([path.read_bytes()])
    box = mboxlib.mbox(str(path), create=False)
    keys = box.keys()
    return len(keys), (box.get_bytes(k) for k in keys)


def _target_mailbox(address: str, create: bool) -> Mailbox:
    box = Mailbox.find_live(address)
    if box is not None:
        return box
    if not create:
        raise click.BadParameter(f"no live mailbox {address!r} (create it first, or pass --create)",
                                 param_hint="--to")
    username, _, domain_name = address.strip().lower().partition("@")
    domain = models.Domain.by_name(domain_name)
    if domain is None:
        raise click.BadParameter(f"{domain_name!r} is not a configured domain", param_hint="--to")
    try:
        return Mailbox.create(username, domain, int(models.cfg("mailbox_lifetime_seconds")), origin="cli")
    except models.MailboxError as exc:
        raise click.BadParameter(f"cannot create {address!r}: {exc.code}", param_hint="--to")


@click.command("import")
@with_appcontext
@click.argument("path", type=click.Path(exists=True, readable=True, path_type=Path))
@click.option("--to", "address", required=True, help="Deliver every message to this address.")
@click.option("--create", is_flag=True, help="Create the mailbox when it does not exist.")
def import_command(path: Path, address: str, create: bool) -> None:
    """Deliver a folder of .eml files, an mbox file or one message to ADDRESS."""
    if "@" not in address:
        raise click.BadParameter(f"{address!r} is not an e-mail address", param_hint="--to")
    box = _target_mailbox(address, create)
    try:
        total, raws = _sources(path)
    except (OSError, mboxlib.Error) as exc:
        raise click.BadParameter(f"cannot read {path}: {exc}", param_hint="PATH")
    if total == 0:
        raise click.BadParameter(f"{path} holds no .eml files", param_hint="PATH")
    stored = 0
    with _bar(total, f"Importing into {box.address}") as bar:
        for raw in raws:
            try:
                stored += len(mailhandler.deliver(raw, [box.address], mail_from="", peer="flask import",
                                                   dedupe=False))
            except mailhandler.DeliveryError:
                pass  # deliver() logged the refusal; the summary counts it
            bar.update(1)
    click.echo(f"Imported {stored} of {counted(total, 'message')} into {box.address}.")
    if stored < total:
        refused = total - stored
        raise click.ClickException(f"{counted(refused, 'message')} {'was' if refused == 1 else 'were'}"
                                   " not stored (see the log).")


# --------------------------------------------------------------------------
# wiring

def init_app(app: Flask) -> None:
    """Register the health and metrics routes, request counting and Flask-Migrate."""
    app.register_blueprint(bp)
    app.after_request(_record_request)
    # render_as_batch: SQLite cannot ALTER most things; batch mode copies the table
    migrate.init_app(app, db, directory=str(MIGRATIONS_DIR), render_as_batch=True, compare_type=True)
