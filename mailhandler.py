"""How mail gets in: MIME parsing, the one ``deliver()``, and its receivers.

Every ingest path (the Salmon SMTP and LMTP daemon, the pipe mode, the IMAP
poller, ``flask import``) hands raw bytes and envelope recipients to
``deliver()``, which asks the recipient policy (``mailpolicy``) which
mailboxes take the message, stages one copy per mailbox in a
``DeliveryBatch`` and commits it durably. Refusals are exceptions with an
SMTP reply and a sysexits code (``mailpolicy.DeliveryError``), so each
receiver maps them the same way.

The daemon itself (subclasses of Salmon's receiver and channel that mend its
known weaknesses) lives in ``smtpserver.py``.
"""
from __future__ import annotations

import binascii
import email.header
import email.utils
import logging
import mimetypes
import os
import re
import sys
from datetime import timedelta
from email import policy
from email.message import Message as EmailMessage
from email.feedparser import BytesFeedParser
from email.parser import BytesParser
from pathlib import Path
from typing import Iterable, Optional

import click
from bs4 import BeautifulSoup
from flask import current_app
from flask.cli import with_appcontext
from sqlalchemy import select

import mailpolicy
import metrics
import models
import retention
import storage
import webhooks
from clock import now
from mailpolicy import (DeliveryError, NoRoom, RelayDenied, StoreFailed, TooLarge,  # noqa: F401
                        UnknownRecipient)
from models import Attachment, Domain, Mailbox, Message, Stat, db

log = logging.getLogger("tempmail.mail")

MAX_DEPTH = 30  # MIME nesting we follow; deeper parts are kept only in the raw .eml
MAX_ATTACHMENTS = 1000  # parts stored as files; the rest stay in the raw .eml
# The stdlib's modern header parser takes quadratic time and gigabytes on a
# megabyte-long folded header (measured: 7 MB Subject, 226 s, 3.4 GiB), and
# its compat32 address parser recurses once per "(": longer headers are read
# from their first MAX_HEADER_CHARS characters with the linear legacy decoder.
MAX_HEADER_CHARS = 16384
MAX_NAME = 200
PARSE_CHUNK = 1 << 20
# Labels senders use for charsets whose real-world content is a superset
# (what browsers do too): decoding with the superset never loses characters.
CHARSET_SUPERSETS = {
    "iso-8859-1": "cp1252", "iso8859-1": "cp1252", "latin1": "cp1252", "latin-1": "cp1252",
    "us-ascii": "cp1252", "ascii": "cp1252", "gb2312": "gb18030", "gbk": "gb18030",
    "x-gbk": "gb18030", "shift_jis": "cp932", "shift-jis": "cp932", "sjis": "cp932",
    "x-sjis": "cp932", "ks_c_5601-1987": "cp949", "euc-kr": "cp949", "iso-8859-8-i": "iso-8859-8",
    "tis-620": "cp874", "iso-8859-11": "cp874",
}
SURROGATES = re.compile("[\ud800-\udfff]")


# --------------------------------------------------------------------------
# text helpers

def clean(value) -> str:
    """A string safe for both databases: raw 8-bit header bytes (kept by the
    parser as surrogate escapes) re-decoded, lone surrogates and NULs gone."""
    text = "" if value is None else str(value)
    if SURROGATES.search(text):
        try:
            text = decode_bytes(text.encode("utf-8", "surrogateescape"), None)
        except UnicodeError:
            text = text.encode("utf-8", "replace").decode("utf-8")
    return text.replace("\x00", "")


def decode_bytes(data: bytes, charset: Optional[str]) -> str:
    """Decode text whatever its label says: the declared charset (or its
    superset), else UTF-8 (when most of it is), else Windows-1252;
    undecodable bytes become U+FFFD."""
    name = (charset or "").strip().strip('"').lower()
    name = CHARSET_SUPERSETS.get(name, name)
    if name and name != "cp1252":
        try:
            return data.decode(name, "replace")
        except (LookupError, UnicodeError, ValueError, TypeError):
            pass  # unknown or unusable label: guess below
    text = data.decode("utf-8", "replace")
    bad = text.count("\ufffd")
    if bad and sum(1 for ch in text if ch > "\x7f") <= 2 * bad:
        return data.decode("cp1252", "replace")  # mostly not UTF-8: a legacy 8-bit text
    return text


def html_to_text(html: str) -> str:
    """Readable text of an HTML body, for messages without a text part."""
    soup = BeautifulSoup(html, "html.parser")
    for tag in soup(["script", "style", "head", "title"]):
        tag.decompose()
    text = soup.get_text("\n")
    lines = [line.strip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def raw_header(msg: EmailMessage, name: str) -> Optional[str]:
    """The first ``name`` header as received (unparsed), or None."""
    return next((v for k, v in msg.raw_items() if k.lower() == name.lower()), None)


def header(msg: EmailMessage, name: str) -> str:
    """A decoded header value; never raises, however broken the header is,
    and takes linear time however long it is (see MAX_HEADER_CHARS)."""
    raw = raw_header(msg, name)
    if raw is None:
        return ""
    if len(raw) > MAX_HEADER_CHARS:
        return legacy_decode(raw[:MAX_HEADER_CHARS])
    try:
        value = msg.get(name)
        return clean(value) if value is not None else ""
    except Exception:  # the header parser has corner cases that raise
        return legacy_decode(raw)


def legacy_decode(raw: str) -> str:
    """RFC 2047 decoding with the regex-based compat32 decoder."""
    try:
        return clean(email.header.make_header(email.header.decode_header(raw)))
    except Exception:
        return clean(raw)


def sender(msg: EmailMessage) -> tuple[str, str]:
    """(display name, address) of the From header."""
    raw = raw_header(msg, "from") or ""
    try:
        addresses = msg["from"].addresses if raw and len(raw) <= MAX_HEADER_CHARS else ()
        if addresses:
            return clean(addresses[0].display_name), clean(addresses[0].addr_spec)
    except Exception:
        pass  # fall back to the lenient compat32 address parser
    try:
        name, addr = email.utils.parseaddr(header(msg, "from"))
    except (RecursionError, ValueError, IndexError):  # "((((..." recurses per parenthesis
        return "", ""
    return clean(name), clean(addr)


def display_name(name: Optional[str], content_type: str, inline: bool) -> str:
    """The name shown for an attachment: no folders, no control characters,
    never empty. It is only ever a label; stored files get server names."""
    name = clean(name or "")
    if "=?" in name:
        name = header_text(name)
    name = re.split(r"[/\\]", name)[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()[:MAX_NAME]
    if name in ("", ".", ".."):
        ext = mimetypes.guess_extension(content_type) or ".bin"
        name = ("image" if inline and content_type.startswith("image/") else "attachment") + ext
    return name


def header_text(value: str) -> str:
    """RFC 2047 decoding of a string that is not a header (e.g. a name parameter)."""
    try:
        return clean(email.header.make_header(email.header.decode_header(value)))
    except Exception:
        return value


# --------------------------------------------------------------------------
# parsing

def parse_message(raw: bytes) -> dict:
    """The Message column fields of ``raw`` plus ``attachments`` (dicts with
    filename, data, content_type, content_id, inline). Never raises: a
    message that cannot be parsed gives what could be read."""
    fields = {"from_email": "", "from_name": "", "to": "", "cc": "", "subject": "", "date": None,
              "message_id": None, "body_text": "", "body_html": "", "attachments": []}
    try:
        msg = parse_bytes(raw)
    except Exception:
        log.warning("unparsable message of %d bytes kept raw", len(raw))
        fields["body_text"] = decode_bytes(bytes(raw[:1 << 20]), None).replace("\x00", "")
        return fields
    fields["from_name"], fields["from_email"] = sender(msg)
    for key in ("to", "cc", "subject"):
        fields[key] = header(msg, key)
    fields["date"] = header(msg, "date") or None
    fields["message_id"] = header(msg, "message-id").strip() or None
    texts: list[str] = []
    htmls: list[str] = []
    try:
        collect_parts(msg, texts, htmls, fields["attachments"], 0)
    except Exception:  # keep what was collected before the broken part
        log.warning("malformed MIME structure in message %s", fields["message_id"])
    fields["body_text"] = clean("\n".join(texts))
    fields["body_html"] = clean("\n".join(htmls))
    if not fields["body_text"] and fields["body_html"]:
        fields["body_text"] = clean(html_to_text(fields["body_html"]))
    return fields


def parse_bytes(raw: bytes) -> EmailMessage:
    """The stdlib parser fed in slices: ``parsebytes`` would first make a str
    copy of the whole message, which doubles the peak memory of a big one."""
    parser = BytesFeedParser(policy=policy.default)
    with memoryview(raw) as view:
        for start in range(0, len(view), PARSE_CHUNK):
            parser.feed(bytes(view[start:start + PARSE_CHUNK]))
    return parser.close()


def part_bytes(part: EmailMessage) -> bytes:
    """The decoded body of a leaf part. Base64 is decoded straight from the
    payload (the stdlib first splits it into lines and joins them again,
    several copies of a 25 MiB attachment); anything odd goes the stdlib way."""
    payload = part.get_payload()
    if isinstance(payload, str) and str(part.get("content-transfer-encoding", "")).strip().lower() == "base64":
        try:
            return binascii.a2b_base64(payload)
        except (binascii.Error, ValueError):
            pass  # bad padding, stray bytes: the stdlib repairs what it can
    return part.get_payload(decode=True) or b""


def collect_parts(part: EmailMessage, texts: list, htmls: list, attachments: list, depth: int) -> None:
    """Walk the MIME tree: inline text and HTML into the body lists, every other
    leaf (and every nested message/rfc822) into ``attachments``."""
    if depth > MAX_DEPTH or len(attachments) >= MAX_ATTACHMENTS:
        return  # kept in the raw .eml only: a 10,000-part message is not 10,000 files
    ctype = part.get_content_type()
    payload = part.get_payload()
    if ctype.startswith("multipart/") and isinstance(payload, list):
        for sub in payload:
            collect_parts(sub, texts, htmls, attachments, depth + 1)
    elif isinstance(payload, list):  # message/rfc822 and friends: keep as a .eml
        attachments.append(nested_message(part, payload))
    else:
        collect_leaf(part, ctype, texts, htmls, attachments)


def nested_message(part: EmailMessage, payload: list) -> dict:
    inner = payload[0] if payload else part
    try:
        data = inner.as_bytes(policy=policy.default.clone(max_line_length=0))
    except Exception:
        data = part.as_bytes()
    subject = header(inner, "subject") if payload else ""
    name = part.get_filename() or ((subject[:80] or "message") + ".eml")
    return {"filename": display_name(name, "message/rfc822", False), "data": data,
            "content_type": "message/rfc822", "content_id": None, "inline": False}


def collect_leaf(part: EmailMessage, ctype: str, texts: list, htmls: list, attachments: list) -> None:
    data = part_bytes(part)
    disposition = part.get_content_disposition()
    filename = part.get_filename()
    if ctype in ("text/plain", "text/html") and disposition != "attachment" and not filename:
        try:
            charset = part.get_content_charset()
        except Exception:
            charset = None
        text = decode_bytes(data, charset).replace("\r\n", "\n")
        (htmls if ctype == "text/html" else texts).append(text)
        return
    content_id = header(part, "content-id").strip().strip("<>").strip()[:255] or None
    inline = disposition == "inline" or (content_id is not None and disposition != "attachment")
    attachments.append({"filename": display_name(filename, ctype, inline), "data": data,
                        "content_type": clean(ctype)[:255], "content_id": content_id,
                        "inline": inline})


# --------------------------------------------------------------------------
# delivery

def max_message_bytes() -> int:
    return int(models.cfg("max_message_bytes"))


class DeliveryBatch:
    """Messages staged in one transaction, then made durable together.

    The daemon's group commit stages many messages in one batch; pipe, IMAP
    and ``flask import`` stage one. Everything the transaction needs to know
    travels here, explicitly: the blobs it wrote (synced before the commit,
    removed on rollback), the counters to add, what it looked up, and the
    blobs it freed by trimming (removed once the commit is durable)."""

    def __init__(self) -> None:
        self.pending = storage.PendingBlobs()
        self.known = mailpolicy.Lookups()
        self.copies: dict[tuple, Message] = {}
        self.stored: list[tuple[Mailbox, Message]] = []  # every new copy, for the webhook outbox
        self.freed: list[str] = []
        self.received = 0
        self.failed = False  # rolled back: whatever was staged is gone

    def stage_files(self) -> None:
        """Make the blobs written so far durable, before the INSERTs take
        SQLite's write lock, so another receiver process can commit meanwhile."""
        self.pending.sync_files()

    def commit(self) -> None:
        """Commit everything staged, durably; StoreFailed (after a rollback) if it cannot be."""
        try:
            self.stage_files()
            if self.received or self.known.created:
                Stat.bump(total_addresses=self.known.created, total_received=self.received)
            # The webhook events commit with the messages they announce, or not at all.
            events = webhooks.stage_events(self.stored)
            storage.commit_durably(self.pending)
        except Exception as exc:
            log.exception("commit of %d stored copies failed", self.received)
            self.rollback()
            raise StoreFailed() from exc
        storage.discard(self.freed)
        self.freed, self.stored = [], []
        if events:
            webhooks.wake()

    def rollback(self) -> None:
        """Undo everything staged, and forget what was looked up in the undone transaction."""
        db.session.rollback()
        self.pending.after_rollback()
        self.known, self.copies, self.freed, self.received = mailpolicy.Lookups(), {}, [], 0
        self.stored = []
        self.failed = True


def forced_failure() -> None:
    """Test hook: ``app.config["FAIL_NEXT_STORE"] = n`` fails the next n stores
    with StoreFailed, the way a full disk or a lost database would."""
    pending = current_app.config.get("FAIL_NEXT_STORE") or 0
    if pending > 0:
        current_app.config["FAIL_NEXT_STORE"] = pending - 1
        raise StoreFailed("Temporary failure storing the message (forced), try again later")


def deliver(raw: bytes, recipients: list[str], mail_from: str = "", peer: str = "",
            batch: Optional[DeliveryBatch] = None, dedupe: bool = True) -> list[Message]:
    """Store ``raw`` once per accepted (mailbox, tag) among ``recipients``: the
    one entry point of every receiver. Raises UnknownRecipient, RelayDenied,
    TooLarge or StoreFailed, whether or not a ``batch`` is given.

    Without ``batch`` the message is committed durably before this returns.
    With one it is staged there, and the caller commits the batch; a store
    failure rolls the whole batch back (the caller stores the others again).
    A sender's retry of a message already stored is answered with the stored
    copy (``earlier_copy``); ``dedupe=False`` (an operator's deliberate
    ``flask import``) always stores."""
    own = batch is None
    batch = batch or DeliveryBatch()
    try:
        targets = accept(raw, recipients, batch)
    except DeliveryError as exc:
        if own:
            batch.rollback()  # a catch-all mailbox flushed for nothing
        log_rejected(exc, mail_from, recipients, len(raw), peer)
        raise
    try:
        msgs = stage(raw, targets, clean(mail_from)[:998], batch, dedupe)
        if own:
            batch.commit()
    except Exception as exc:
        batch.rollback()
        failure = exc if isinstance(exc, StoreFailed) else StoreFailed()
        if not isinstance(exc, StoreFailed):
            log.exception("store failed for message from %s", clean(mail_from)[:200])
        log_rejected(failure, mail_from, recipients, len(raw), peer)
        raise failure from exc
    if own:
        log_accepted(describe(msgs, peer))
    return msgs


def accept(raw: bytes, recipients: list[str], batch: DeliveryBatch) -> list[tuple[Mailbox, Optional[str]]]:
    """The refusals that come before anything is written: size, then the recipient policy."""
    if len(raw) > max_message_bytes():
        raise TooLarge(f"Message size exceeds fixed maximum message size ({max_message_bytes()})")
    targets = mailpolicy.mailboxes_for(recipients, batch.known)
    forced_failure()
    return targets


def stage(raw: bytes, targets: list, envelope_from: str, batch: DeliveryBatch, dedupe: bool) -> list[Message]:
    """Add one copy per target to the batch (or find the copy stored earlier)."""
    sha = storage.digest(raw)  # once per message, for the blob and the duplicate check
    fields: Optional[dict] = None
    msgs = []
    for box, tag in targets:
        earlier = earlier_copy(box, tag, sha, envelope_from, batch) if dedupe else None
        if earlier is None and fields is None:
            fields = parse_message(raw)
        msgs.append(earlier or store_copy(box, tag, dict(fields or {}), raw, sha, envelope_from, batch))
        # The per-mailbox cap (max_messages_per_mailbox) in the same
        # transaction: a mailbox never holds more once the delivery is durable.
        batch.freed += retention.trim_mailbox(box.id).freed
    return msgs


def store_copy(box: Mailbox, tag: Optional[str], fields: dict, raw: bytes, sha: str,
               envelope_from: str, batch: DeliveryBatch) -> Message:
    """Stage one copy for ``box`` in the batch."""
    parts = fields.pop("attachments", [])
    columns = dict({"envelope_from": envelope_from, "envelope_to": box.address, "tag": tag}, **fields)
    msg = Message(mailbox_id=box.id, received_at=now(), size=len(raw),
                  raw_sha256=batch.pending.add(raw, sha), **columns)
    # Assigned, not extended: a pending object's extended collection is not
    # marked loaded, and reading it later (the log line) cost one SELECT.
    msg.attachments = attachment_rows(parts, batch.pending)
    db.session.add(msg)
    batch.received += 1
    batch.copies[(box.id, tag, sha, envelope_from)] = msg
    batch.stored.append((box, msg))
    return msg


def attachment_rows(parts: Iterable[dict], pending: storage.PendingBlobs) -> list[Attachment]:
    """Stage each part's bytes as a blob and return its Attachment rows (not
    added); display names are made unique within the message."""
    seen: set[str] = set()
    return [Attachment(filename=models.unique_name(part.get("filename") or "attachment", seen),
                       sha256=pending.add(part["data"]), size=len(part["data"]),
                       content_type=part.get("content_type") or "application/octet-stream",
                       content_id=part.get("content_id"), inline=bool(part.get("inline")))
            for part in parts]


def earlier_copy(box: Mailbox, tag: Optional[str], sha: str, envelope_from: str,
                 batch: DeliveryBatch) -> Optional[Message]:
    """The copy of these very bytes from the same envelope sender that ``box``
    (under the same ``tag``) got within ``dedupe_window_seconds`` (0 = off), or None.

    A sender that lost our 250 (the daemon was killed after its commit, the
    connection dropped) sends the same bytes again; answering with the stored
    copy instead of a second one makes every retry land exactly once. Mail
    that differs in any byte (another Date or Message-ID) is never merged."""
    window = int(models.cfg("dedupe_window_seconds") or 0)
    if window <= 0:
        return None
    key = (box.id, tag, sha, envelope_from)
    if key in batch.copies:
        return batch.copies[key]  # stored earlier in this batch: no query, no flush
    since = now() - timedelta(seconds=window)
    with db.session.no_autoflush:
        return db.session.scalar(select(Message).where(
            Message.raw_sha256 == sha, Message.mailbox_id == box.id, Message.tag.is_(tag) if tag is None
            else Message.tag == tag, Message.envelope_from == envelope_from,
            Message.received_at >= since).limit(1))


def store_message(box: Mailbox, fields: dict, raw: bytes, attachments: Iterable[dict] = ()) -> Message:
    """Store one message with the given parsed ``fields`` and ``attachments``
    in ``box``, bypassing parsing and the policy, and commit it durably (for
    ``flask import``-like tools and tests that need exact fields)."""
    batch = DeliveryBatch()
    fields = dict(fields, attachments=list(attachments))
    msg = store_copy(box, None, fields, raw, storage.digest(raw), "", batch)
    batch.commit()
    return msg


def describe(msgs: list, peer: str, queue_id: str = "") -> list[str]:
    """The log line of each stored copy, written once the commit succeeded."""
    queue = f"queue={queue_id} " if queue_id else ""
    return [f"accepted id={m.id} {queue}from=<{m.envelope_from}> to=<{m.envelope_to}> size={m.size} "
            f"attachments={len(m.attachments)} peer={peer}" for m in msgs]


def log_accepted(lines: list[str]) -> None:
    """One log line (and one metrics count) per stored copy, once durable."""
    for line in lines:
        metrics.count_message("accepted")
        log.info(line)


def log_rejected(exc: DeliveryError, mail_from: str, recipients, size: int, peer: str) -> None:
    metrics.count_message("rejected", exc.reason)
    log.info("rejected %s from=<%s> to=%s size=%d peer=%s", exc.smtp_reply, mail_from,
             ",".join(f"<{r}>" for r in recipients), size, peer)


# --------------------------------------------------------------------------
# pipe mode

def recipients_from_headers(msg: EmailMessage) -> list[str]:
    """Envelope recipients guessed from the headers: ``Delivered-To`` and
    ``X-Original-To`` first (they name Bcc recipients too), then To and Cc;
    only addresses on our domains count."""
    ours = set(Domain.active_names(("free", "premium")))
    for names in (("delivered-to", "x-original-to"), ("to", "cc")):
        found = []
        for name in names:
            for value in msg.get_all(name) or []:
                for _, addr in email.utils.getaddresses([clean(value)]):
                    if mailpolicy.parse_recipient(addr).domain in ours and addr.lower() not in found:
                        found.append(addr.lower())
        if found:
            return found
    return []


def headers_only(raw: bytes) -> EmailMessage:
    return BytesParser(policy=policy.default).parsebytes(raw, headersonly=True)


def pipe_recipients(raw: bytes, to: tuple[str, ...]) -> list[str]:
    """``--to``, else ``ORIGINAL_RECIPIENT`` / ``RECIPIENT`` (Postfix, Exim), else the headers."""
    if to:
        return [a.strip() for item in to for a in item.split(",") if a.strip()]
    for var in ("ORIGINAL_RECIPIENT", "RECIPIENT"):
        if os.environ.get(var, "").strip():
            return [a.strip() for a in os.environ[var].split(",") if a.strip()]
    return recipients_from_headers(headers_only(raw))


def pipe_main(stream, to: tuple[str, ...]) -> int:
    """Deliver one message read from ``stream``; returns a sysexits code."""
    limit = max_message_bytes()
    raw = stream.read(limit + 1)
    if not raw.strip():
        click.echo("pipe: empty message", err=True)
        return 65
    if len(raw) > limit:
        click.echo(f"pipe: {TooLarge().smtp_reply}", err=True)
        return TooLarge.exit_code
    recipients = pipe_recipients(raw, to)
    if not recipients:
        click.echo("pipe: no recipient on the command line, in the environment or the headers", err=True)
        return 65
    try:
        msgs = deliver(raw, recipients, os.environ.get("SENDER", ""), "pipe")
    except DeliveryError as exc:
        click.echo(f"pipe: {exc.smtp_reply}", err=True)
        return exc.exit_code
    except Exception:  # the database is down, ...: the MTA keeps it and retries
        log.exception("pipe delivery failed")
        return StoreFailed.exit_code
    click.echo(" ".join(str(m.id) for m in msgs))
    return 0


@click.command("pipe")
@click.option("--to", "to", multiple=True, help="Envelope recipient (repeatable).")
@with_appcontext
def pipe_command(to: tuple[str, ...]) -> None:
    """Store one message read on stdin (exit 0 stored, 67 unknown user, 65 bad input, 75 retry)."""
    sys.exit(pipe_main(sys.stdin.buffer, to))


# --------------------------------------------------------------------------
# python mailhandler.py pipe

def main(argv: list[str]) -> int:
    """``python mailhandler.py pipe ...`` for MTAs: the app's commands, and exit
    75 (try again later) when the app cannot even start, e.g. the database is down."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from app import create_app
    try:
        app = create_app()
    except Exception as exc:
        print(f"mailhandler: cannot start: {exc}", file=sys.stderr)
        return StoreFailed.exit_code
    with app.app_context():
        return app.cli.main(args=argv, prog_name="mailhandler.py", standalone_mode=True) or 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
