"""``flask imap-poll``: drain a catch-all IMAP mailbox into TempMail.

For shared hosting, where port 25 belongs to the host's MTA: point every
address of the domain at one catch-all mailbox and let this command move
the mail over. The recipient comes from ``Delivered-To`` / ``X-Original-To``
before ``To`` / ``Cc`` (so Bcc'd mail finds its mailbox). A stored message
is deleted from the IMAP folder; one refused for good (unknown user, not our
domain) is flagged ``\\Seen`` and left for the operator; one that failed for
a passing reason stays unseen and is tried again on the next poll.
"""
from __future__ import annotations

import imaplib
import logging
import ssl
import time

import click
from flask import current_app
from flask.cli import with_appcontext

import mailhandler

log = logging.getLogger("tempmail.imap")


def settings() -> dict:
    """The ``imap`` section of the configuration, with defaults."""
    conf = dict(current_app.config["TEMPMAIL"].get("imap") or {})
    tls = conf.get("tls", False)
    conf.setdefault("port", 993 if tls in (True, "ssl") else 143)
    conf.setdefault("folder", "INBOX")
    conf.setdefault("interval", 60)
    return conf


def connect(conf: dict) -> imaplib.IMAP4:
    """A logged-in IMAP connection: implicit TLS (``tls: true`` / ``"ssl"``),
    STARTTLS (``"starttls"``) or plain (``false``, for a local server)."""
    if not conf.get("host") or not conf.get("user"):
        raise click.ClickException("imap.host and imap.user must be set in the configuration")
    tls = conf.get("tls", False)
    if tls in (True, "ssl"):
        conn = imaplib.IMAP4_SSL(conf["host"], int(conf["port"]), ssl_context=ssl.create_default_context(),
                                 timeout=60)
    else:
        conn = imaplib.IMAP4(conf["host"], int(conf["port"]), timeout=60)
        if tls == "starttls":
            conn.starttls(ssl.create_default_context())
    conn.login(conf["user"], conf.get("password") or "")
    return conn


def ingest(raw: bytes) -> str:
    """Deliver one fetched message: ``stored``, ``refused`` (for good) or ``failed`` (retry)."""
    recipients = mailhandler.recipients_from_headers(mailhandler.headers_only(raw))
    if not recipients:
        log.info("rejected imap message of %d bytes: no recipient on our domains", len(raw))
        return "refused"
    try:
        mailhandler.deliver(raw, recipients, "", "imap")
    except mailhandler.DeliveryError as exc:
        return "refused" if exc.permanent else "failed"
    except Exception:
        log.exception("imap delivery failed")
        return "failed"
    return "stored"


def fetch(conn: imaplib.IMAP4, uid: bytes) -> bytes | None:
    typ, parts = conn.uid("FETCH", uid, "(BODY.PEEK[])")  # PEEK: a failure stays unseen
    if typ != "OK":
        return None
    return next((part[1] for part in parts if isinstance(part, tuple)), None)


def poll_once(conf: dict) -> dict:
    """Drain the folder once; returns how many messages were stored, refused, failed."""
    counts = {"stored": 0, "refused": 0, "failed": 0}
    conn = connect(conf)
    try:
        typ, _ = conn.select(conf["folder"])
        if typ != "OK":
            raise click.ClickException(f"cannot open IMAP folder {conf['folder']!r}")
        _, data = conn.uid("SEARCH", None, "UNSEEN")
        for uid in (data[0] or b"").split():
            raw = fetch(conn, uid)
            outcome = ingest(raw) if raw is not None else "failed"
            counts[outcome] += 1
            if outcome == "stored":
                conn.uid("STORE", uid, "+FLAGS.SILENT", r"(\Deleted)")
            elif outcome == "refused":
                conn.uid("STORE", uid, "+FLAGS.SILENT", r"(\Seen)")
        conn.expunge()
    finally:
        try:
            conn.logout()
        except (imaplib.IMAP4.error, OSError):
            pass
    return counts


@click.command("imap-poll")
@click.option("--once", is_flag=True, help="Drain the mailbox once and exit.")
@with_appcontext
def imap_poll_command(once: bool) -> None:
    """Move mail from the catch-all IMAP mailbox (the imap section of the config) into TempMail."""
    conf = settings()
    while True:
        try:
            counts = poll_once(conf)
            click.echo("stored {stored}, refused {refused}, failed {failed}".format(**counts))
        except (imaplib.IMAP4.error, OSError) as exc:
            if once:
                raise click.ClickException(f"IMAP: {exc}")
            log.warning("IMAP poll failed: %s", exc)
        if once:
            return
        time.sleep(float(conf["interval"]))
