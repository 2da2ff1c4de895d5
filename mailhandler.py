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
from email.parser import BytesParser
from pathlib import Path
from typing import Iterable, Optional

import click
from flask import current_app
from flask.cli import with_appcontext
from sqlalchemy import bindparam, insert, select
from sqlalchemy.orm import configure_mappers, make_transient_to_detached
from sqlalchemy.orm.attributes import set_committed_value

import database
import idgen
import mailevents
import mailpolicy
import metrics
import models
import retention
import storage
import webhooks
from clock import now
from htmltext import html_to_text
from mailparse import PARSE_POLICY, BoundedMessage, line_extent, parse_bytes
from mailpolicy import (DeliveryError, NoRoom, RelayDenied, StoreFailed, TooLarge,  # noqa: F401
                        UnknownRecipient)
from mimeheaders import (MAX_DEPTH, MAX_HEADER_CHARS, MAX_PARSE_LINES, SPAN_CODECS, decode_span,
                         decode_transfer, plain_addresses, plain_value, safe_codec, unfold)
from models import Attachment, Domain, Mailbox, Message, MessageSource, Stat, db

log = logging.getLogger("tempmail.mail")

MAX_ATTACHMENTS = 1000  # parts stored as files; the rest stay in the raw .eml
# MAX_DEPTH and MAX_HEADER_CHARS (mimeheaders): every header is read from its
# first 16 KiB, once per message part; the stdlib's header parser takes
# quadratic time and gigabytes on a megabyte-long one (measured: 7 MB
# Subject, 226 s, 3.4 GiB).
MAX_NAME = 200
# Of text and of HTML body kept in the Message row (each; the raw .eml keeps
# all). A str costs up to 4 bytes a character and is copied when decoded and
# stored: uncapped, 25 MiB of ASCII text with one emoji took the daemon
# 381 MiB over idle. Webmail clips far earlier (Gmail: 102 KB of HTML).
MAX_BODY_BYTES = 6 << 20
TRUNCATED = "\n[\u2026]"
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
HIGH_BYTES = bytes(range(0x80, 0x100))


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
    codec = safe_codec(name) if name and name != "cp1252" else None
    if codec:
        try:
            return data.decode(codec, "replace")
        except (UnicodeError, ValueError, TypeError):
            pass  # unusable label ("undefined"): guess below
    text = data.decode("utf-8", "replace")
    bad = text.count("\ufffd")
    # Non-ASCII characters = all minus the ASCII bytes (counted in C: a
    # 25 MiB body must not be walked character by character in Python).
    if bad and len(text) - len(data.translate(None, HIGH_BYTES)) <= 2 * bad:
        text = None  # freed before the second decoding of a big body
        return data.decode("cp1252", "replace")  # mostly not UTF-8: a legacy 8-bit text
    return text


def raw_header(msg: EmailMessage, name: str) -> Optional[str]:
    """The first ``name`` header as received (unparsed, unfolded), cut to
    MAX_HEADER_CHARS, or None: the one way headers are read here."""
    if isinstance(msg, BoundedMessage):
        return msg.raw_value(name)  # read once per part
    value = next((v for k, v in msg.raw_items() if k.lower() == name.lower()), None)
    return None if value is None else unfold(value[:MAX_HEADER_CHARS])


def header(msg: EmailMessage, name: str) -> str:
    """A decoded header value; never raises, however broken the header is.
    On a parsed message (BoundedMessage) the stdlib parses each header once,
    from its first MAX_HEADER_CHARS characters."""
    raw = raw_header(msg, name)
    if raw is None:
        return ""
    plain = plain_value(name.lower(), raw)  # the stdlib's answer, without its parse
    if plain is not None:
        return plain
    try:
        if isinstance(msg, BoundedMessage):
            value = msg.get(name)
        else:
            value = PARSE_POLICY.header_fetch_parse(name, raw)
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
    plain = plain_addresses(raw_header(msg, "from") or ",")  # the stdlib's answer, without its parse
    if plain:
        return plain[0]
    try:
        value = msg.get("from") if isinstance(msg, BoundedMessage) else None
        addresses = value.addresses if value is not None else ()
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
    del msg  # the parsed tree (and its copy of every body) is not needed any more
    fields["body_text"] = clean(join_and_clear(texts))
    fields["body_html"] = clean(join_and_clear(htmls))
    if not fields["body_text"] and fields["body_html"]:
        fields["body_text"] = clean(html_to_text(fields["body_html"]))
    return fields


def join_and_clear(parts: list[str]) -> str:
    """The parts joined by newlines; the list is emptied, so a big body is
    not held twice while it is cleaned."""
    text = "\n".join(parts)
    parts.clear()
    return text


def part_bytes(part: BoundedMessage) -> bytes:
    """The decoded body of a leaf part (see ``leaf_bytes``)."""
    return leaf_bytes(part)[0]


def leaf_bytes(part: BoundedMessage) -> tuple[bytes, Optional[str]]:
    """The decoded body of a leaf part, which is then dropped from the parsed
    tree (its last use: a 25 MiB body is not held twice while it is decoded),
    and the transfer encoding it was decoded from by
    ``mimeheaders.decode_transfer`` ("" for none), or None when it took the
    stdlib's way. Base64 and quoted-printable are decoded in C straight from
    the payload (the stdlib first splits base64 into lines and joins them
    again, several copies of a 25 MiB attachment); uuencode and base64 that
    needs more than padding go the stdlib way."""
    cte, data = transfer_encoding(part), None
    if cte in SPAN_CODECS:
        data = decode_transfer(part.payload_bytes(), cte)
    elif cte not in ("x-uuencode", "uuencode", "uue", "x-uue"):
        data, cte = part.payload_bytes(), None  # an unknown encoding: kept as it came
    if data is None:
        data, cte = part.get_payload(decode=True) or b"", None
    part.set_payload(None)
    return data, cte


def transfer_encoding(part: EmailMessage) -> str:
    """The Content-Transfer-Encoding token in lower case ("" when absent)."""
    words = (raw_header(part, "content-transfer-encoding") or "").split(None, 1)
    return words[0].lower() if words else ""


def collect_parts(part: BoundedMessage, texts: list, htmls: list, attachments: list, depth: int) -> None:
    """Walk the MIME tree: inline text and HTML into the body lists, every other
    leaf (and every nested message/rfc822) into ``attachments``."""
    if depth > MAX_DEPTH or len(attachments) >= MAX_ATTACHMENTS or part.opaque or part.unfinished:
        return  # kept in the raw .eml only: a 10,000-part message is not 10,000 files
    ctype = part.get_content_type()
    if not part.is_multipart():  # (get_payload() of a leaf would decode all of it)
        collect_leaf(part, ctype, texts, htmls, attachments)
    elif ctype.startswith("multipart/"):
        for sub in part.get_payload():
            collect_parts(sub, texts, htmls, attachments, depth + 1)
    else:  # message/rfc822 and friends: keep as a .eml
        attachments.append(nested_message(part, part.get_payload()))


def nested_message(part: EmailMessage, payload: list) -> dict:
    inner = payload[0] if payload else part
    try:
        data = inner.as_bytes(policy=policy.default.clone(max_line_length=0))
    except Exception:
        data = part.as_bytes()
    # Only a file label: the linear decoder, not a stdlib parse per nested message.
    subject = legacy_decode(raw_header(inner, "subject") or "") if payload else ""
    name = part.get_filename() or ((subject[:80] or "message") + ".eml")
    return {"filename": display_name(name, "message/rfc822", False), "data": data,
            "content_type": "message/rfc822", "content_id": None, "inline": False}


def body_text(data: bytes, charset: Optional[str], room: int) -> str:
    """The text of a body part, from at most ``room`` of its bytes (a mark
    tells when it was cut). Each copy of a big body is dropped as soon as
    the next one exists."""
    cut = len(data) > room
    if cut:
        data = data[:room]
    text = decode_bytes(data, charset)
    del data
    text = text.replace("\r\n", "\n") if "\r" in text else text
    return text + TRUNCATED if cut else text


def collect_leaf(part: EmailMessage, ctype: str, texts: list, htmls: list, attachments: list) -> None:
    disposition = part.get_content_disposition()
    filename = part.get_filename()
    if ctype in ("text/plain", "text/html") and disposition != "attachment" and not filename:
        try:
            charset = part.get_content_charset()
        except Exception:
            charset = None
        body = htmls if ctype == "text/html" else texts
        room = MAX_BODY_BYTES - sum(len(text) for text in body)
        if room > 0:
            body.append(body_text(part_bytes(part), charset, room))
        return
    span = part.source_span
    data, codec = leaf_bytes(part)
    content_id = clean(raw_header(part, "content-id") or "").strip().strip("<>").strip()[:255] or None
    inline = disposition == "inline" or (content_id is not None and disposition != "attachment")
    found = {"filename": display_name(filename, ctype, inline), "data": data,
             "content_type": clean(ctype)[:255], "content_id": content_id, "inline": inline}
    if span is not None and codec is not None:
        # Where its bytes are in the raw message, and how they decode: a
        # message kept in a row of its own then stores the attachment as that
        # span (attachment_rows), not as a second copy of the same bytes.
        found["span"] = (span[0], span[1], codec)
    attachments.append(found)


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

    def __init__(self, attach: bool = True) -> None:
        # attach: hand the stored messages to the session as rows it loaded,
        # for callers of ``deliver`` that go on using them. The daemon's
        # group commit only logs them: it passes False and saves that work
        # (8 % of its writer's CPU per message; bench/README "Session 9").
        self.attach = attach
        self.pending = storage.PendingBlobs()
        self.known = mailpolicy.Lookups()
        self.copies: dict[tuple, Message] = {}
        self.stored: list[tuple[Mailbox, Message]] = []  # every new copy, for the webhook outbox
        self.sources: list[tuple[Message, bytes]] = []  # raw bytes kept in the message's row (MessageSource)
        self.capped: list[int] = []  # mailboxes delivered to: trimmed to the cap at commit
        self.freed: list[str] = []
        self.earlier: dict[tuple, int] = {}  # (mailbox id, tag, sha, envelope from) -> id, see look_up_earlier
        self.looked_up: set[str] = set()  # the digests ``earlier`` answers for
        self.received = 0
        self.failed = False  # rolled back: whatever was staged is gone

    def look_up_earlier(self, shas: list[str]) -> None:
        """The duplicate filter's look-up for a whole batch in one query: the
        copies of these digests stored within the window, whatever their
        mailbox (``earlier_copy`` then needs no query per message)."""
        window = int(models.cfg("dedupe_window_seconds") or 0)
        shas = [sha for sha in dict.fromkeys(shas) if sha not in self.looked_up]
        if window <= 0 or not shas:
            return
        since = now() - timedelta(seconds=window)
        try:
            params = dict({f"sha_{i}": sha for i, sha in enumerate(shas)}, since=since)
            rows = database.prepared(earlier_any, len(shas)).rows(database.raw_cursor(), **params)
        except Exception as exc:
            log.exception("duplicate look-up of %d messages failed", len(shas))
            self.rollback()
            raise StoreFailed() from exc
        for msg_id, sha, mailbox_id, tag, envelope_from in rows:
            self.earlier.setdefault((mailbox_id, tag, sha, envelope_from), msg_id)
        self.looked_up.update(shas)

    def look_up_recipients(self, recipients: list[str]) -> None:
        """The recipient policy's look-up for a whole batch in one query:
        the active domains and the mailboxes of ``recipients``."""
        try:
            mailpolicy.look_up(recipients, self.known)
        except Exception as exc:
            log.exception("recipient look-up of %d addresses failed", len(recipients))
            self.rollback()
            raise StoreFailed() from exc

    def stage_files(self) -> None:
        """Make the blobs written so far durable, before the INSERTs take
        SQLite's write lock, so another receiver process can commit meanwhile."""
        self.pending.sync_files()

    def commit(self) -> None:
        """Commit everything staged, durably; StoreFailed (after a rollback) if it cannot be."""
        # Read before the commit, which expires the rows: the mailboxes whose
        # waiters (long polls, streams) are told of new mail (mailevents.py).
        boxes = {msg.mailbox_id for msg in self.copies.values()}
        try:
            self.stage_files()
            insert_rows([msg for _box, msg in self.stored], self.attach)
            insert_sources(self.sources)
            # The per-mailbox cap (max_messages_per_mailbox) in the same
            # transaction: a mailbox never holds more once the delivery is durable.
            for box_id in dict.fromkeys(self.capped):
                self.freed += retention.trim_mailbox(box_id).freed
            if self.received or self.known.created:
                Stat.bump(total_addresses=self.known.created, total_received=self.received)
            mailevents.announce(boxes)  # PostgreSQL: NOTIFY inside this transaction
            # The webhook events commit with the messages they announce, or not at all.
            events = webhooks.stage_events(self.stored)
            storage.commit_durably(self.pending)
        except Exception as exc:
            log.exception("commit of %d stored copies failed", self.received)
            self.rollback()
            raise StoreFailed() from exc
        mailevents.delivered(boxes)  # SQLite: poke the web workers, now that it is visible
        storage.discard(self.freed)
        self.freed, self.stored, self.capped, self.sources = [], [], [], []
        if events:
            webhooks.wake()

    def rollback(self) -> None:
        """Undo everything staged, and forget what was looked up in the undone transaction."""
        db.session.rollback()
        self.pending.after_rollback()
        self.known, self.copies, self.freed, self.received = mailpolicy.Lookups(), {}, [], 0
        self.stored, self.earlier, self.looked_up, self.capped, self.sources = [], {}, set(), [], []
        self.failed = True


def forced_failure() -> None:
    """Test hook: ``app.config["FAIL_NEXT_STORE"] = n`` fails the next n stores
    with StoreFailed, the way a full disk or a lost database would."""
    pending = current_app.config.get("FAIL_NEXT_STORE") or 0
    if pending > 0:
        current_app.config["FAIL_NEXT_STORE"] = pending - 1
        raise StoreFailed("Temporary failure storing the message (forced), try again later")


def deliver(raw: bytes, recipients: list[str], mail_from: str = "", peer: str = "",
            batch: Optional[DeliveryBatch] = None, dedupe: bool = True, sha: Optional[str] = None,
            fields: Optional[dict] = None) -> list[Message]:
    """Store ``raw`` once per accepted (mailbox, tag) among ``recipients``: the
    one entry point of every receiver. Raises UnknownRecipient, RelayDenied,
    TooLarge or StoreFailed, whether or not a ``batch`` is given.

    Without ``batch`` the message is committed durably before this returns.
    With one it is staged there, and the caller commits the batch; a store
    failure rolls the whole batch back (the caller stores the others again).
    A sender's retry of a message already stored is answered with the stored
    copy (``earlier_copy``); ``dedupe=False`` (an operator's deliberate
    ``flask import``) always stores. ``sha``: the SHA-256 of ``raw`` when
    the caller computed it already; ``fields``: ``parse_message(raw)``, when
    the caller parsed it already (the daemon's receiver processes)."""
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
        msgs = stage(raw, targets, clean(mail_from)[:998], batch, dedupe, sha, fields)
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


def stage(raw: bytes, targets: list, envelope_from: str, batch: DeliveryBatch, dedupe: bool,
          sha: Optional[str] = None, fields: Optional[dict] = None) -> list[Message]:
    """Add one copy per target to the batch (or find the copy stored earlier);
    ``fields``: ``parse_message(raw)`` if made already, else made here if needed."""
    sha = sha or storage.digest(raw)  # once per message, for the blob and the duplicate check
    msgs = []
    for box, tag in targets:
        earlier = earlier_copy(box, tag, sha, envelope_from, batch) if dedupe else None
        if earlier is None and fields is None:
            fields = parse_message(raw)
        msgs.append(earlier or store_copy(box, tag, dict(fields or {}), raw, sha, envelope_from, batch,
                                          copies=len(targets)))
        batch.capped.append(box.id)
    return msgs


def store_copy(box: Mailbox, tag: Optional[str], fields: dict, raw: bytes, sha: str,
               envelope_from: str, batch: DeliveryBatch, copies: int = 1) -> Message:
    """Stage one copy for ``box`` in the batch, one of ``copies`` this delivery stores."""
    parts = fields.pop("attachments", [])
    columns = dict({"envelope_from": envelope_from, "envelope_to": box.address, "tag": tag}, **fields)
    # A row of its own only for a message stored once: one sent to many
    # recipients shares one blob, so a sender cannot make us store its bytes
    # once per RCPT (SECURITY.md, "8a. Disk").
    own_row = copies == 1 and storage.source_in_row(len(raw))
    msg = new_message(mailbox_id=box.id, received_at=now(), size=len(raw), public_id=idgen.new_public_id(),
                      raw_sha256=sha if own_row else batch.pending.add(raw, sha), **columns)
    if own_row:
        batch.sources.append((msg, raw))
    # Assigned, not extended: an extended collection of a new object is not
    # marked loaded, and reading it later (the log line) cost one SELECT.
    # Not added to the session: the batch INSERTs its rows (insert_rows).
    if parts:
        msg.attachments = attachment_rows(parts, batch.pending, own_row, raw)  # also sets each one's .message
    else:  # nothing to point back: loaded as empty without the events (~4 us of ~9)
        set_committed_value(msg, "attachments", [])
    batch.received += 1
    batch.copies[(box.id, tag, sha, envelope_from)] = msg
    batch.stored.append((box, msg))
    return msg


def new_message(**columns) -> Message:
    """A new Message holding ``columns`` (the others: their defaults), its
    values written straight into the object's dict: ``insert_rows`` makes it
    a row as loaded, so the ORM's per-attribute events and history of the
    constructor were work for nothing (a quarter of staging a message)."""
    unknown = columns.keys() - _MESSAGE_DEFAULTS.keys()
    if unknown:
        raise TypeError(f"not a column of messages: {sorted(unknown)}")
    if not _mappers_ready:
        # The constructor's init event configures the mappers before a first
        # object; an instance made without it must ask for that itself.
        configure_mappers()
        _mappers_ready.append(True)
    msg = Message._sa_class_manager.new_instance()
    msg.__dict__.update(_MESSAGE_DEFAULTS, **columns)
    return msg


def insert_rows(msgs: list[Message], attach: bool = True) -> None:
    """INSERT new messages and their attachments with Core, in the caller's
    transaction, then (``attach``) hand the objects to the session as rows
    it loaded; else they stay objects of their own, their ids set.

    The ORM's unit of work (and building its state for every object) was a
    third of the daemon's writer time per message; here a batch is one
    multi-row INSERT of messages (``public_id`` matches each RETURNING id
    to its row) and one of attachments."""
    if not msgs:
        return
    # On the raw connection, compiled once per row count: SQLAlchemy's
    # execution path cost more than the INSERT itself.
    ids = {public_id: msg_id for msg_id, public_id in database.run_in_parts(
        [msg.__dict__ for msg in msgs], _MESSAGE_COLUMNS, INSERT_ROWS, insert_messages)}
    atts = []
    for msg in msgs:
        msg.__dict__["id"] = msg_id = ids[msg.public_id]  # as loaded: no history to clear
        for att in msg.attachments:
            att.message_id = msg_id
            atts.append(att)
    if atts:
        att_ids = db.session.connection().execute(INSERT_ATTACHMENTS, [row_of(a, _att) for a in atts]).scalars().all()
        for att, att_id in zip(atts, att_ids):
            att.id = att_id
            make_transient_to_detached(att)
    if not attach:
        return
    for msg in msgs:
        make_transient_to_detached(msg)
        db.session.add(msg)  # persistent, as if loaded: no INSERT at the next flush


def insert_sources(sources: list[tuple[Message, bytes]]) -> None:
    """The raw bytes of the batch's messages that keep them in a row of
    their own (``storage.source_in_row``), once ``insert_rows`` gave the
    messages their ids: one multi-row INSERT per SOURCE_ROWS."""
    rows = [{"message_id": msg.id, "data": data} for msg, data in sources]
    database.run_in_parts(rows, ("message_id", "data"), SOURCE_ROWS, insert_source_rows)


def insert_source_rows(count: int):
    """The multi-row INSERT of ``count`` message sources (``message_id_<i>``, ``data_<i>``)."""
    return insert(_src).values([{"message_id": bindparam(f"message_id_{i}", type_=_src.c.message_id.type),
                                 "data": bindparam(f"data_{i}", type_=_src.c.data.type)} for i in range(count)])


def row_of(obj, table) -> dict:
    """The column values of a new object, column defaults filling what it left unset."""
    row = {}
    for column in table.columns:
        value = getattr(obj, column.key, None)
        if value is None and column.default is not None and column.default.is_scalar:
            value = column.default.arg
            setattr(obj, column.key, value)
        if column.key != "id":
            row[column.key] = value
    return row


def attachment_rows(parts: Iterable[dict], pending: storage.PendingBlobs,
                    in_source: bool = False, raw: bytes = b"") -> list[Attachment]:
    """Return each part's Attachment row (not added), its bytes staged as a
    blob, or (``in_source``: the message's raw bytes ``raw`` are kept in a
    row of their own) named by their span of those bytes when the parse
    found one (``collect_leaf``); display names are made unique within the
    message. A part shipped without its bytes (``shipped``) is read back
    from its span of ``raw`` when it needs a blob after all."""
    seen: set[str] = set()
    rows = []
    for part in parts:
        span = part.get("span")
        row = Attachment(filename=models.unique_name(part.get("filename") or "attachment", seen),
                         size=len(part["data"]) if "data" in part else part["size"],
                         content_type=part.get("content_type") or "application/octet-stream",
                         content_id=part.get("content_id"), inline=bool(part.get("inline")))
        if in_source and span is not None:
            row.keep_as_span(*span)
        else:
            row.sha256 = pending.add(part["data"] if "data" in part else decode_span(raw, span))
        rows.append(row)
    return rows


def shipped(fields: dict) -> dict:
    """``fields`` (``parse_message``'s) made ready to go to the writer
    process: an attachment found as a span of the raw bytes goes without
    its decoded bytes, only their size, since the writer has the raw bytes
    and stores the span (or reads the bytes back from it: attachment_rows),
    so a 100 KB attachment does not cross the link twice."""
    for part in fields["attachments"]:
        if "span" in part:
            part["size"] = len(part.pop("data"))
    return fields


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
    if sha in batch.looked_up:  # the batch's one look-up (the daemon's group commit)
        found = batch.earlier.get(key)
        return db.session.get(Message, found) if found is not None else None
    params = {"sha": sha, "mailbox_id": box.id, "tag": tag, "envelope_from": envelope_from,
              "since": now() - timedelta(seconds=window)}
    # A statement built once, run as Core on the batch's connection (building
    # the ORM select per message cost more than running it). It seeks the
    # (raw_sha256, mailbox_id) index: the same bytes in the same mailbox are
    # a handful of rows at most, so the cost never grows with the mailbox.
    found = db.session.connection().execute(EARLIER_UNTAGGED if tag is None else EARLIER_TAGGED,
                                            params).scalar()
    return db.session.get(Message, found) if found is not None else None


_msg = Message.__table__
_EARLIER = (select(_msg.c.id).where(_msg.c.raw_sha256 == bindparam("sha"),
                                    _msg.c.mailbox_id == bindparam("mailbox_id"),
                                    _msg.c.envelope_from == bindparam("envelope_from"),
                                    _msg.c.received_at >= bindparam("since")).limit(1))
EARLIER_UNTAGGED = _EARLIER.where(_msg.c.tag.is_(None))
EARLIER_TAGGED = _EARLIER.where(_msg.c.tag == bindparam("tag"))
_att = Attachment.__table__
_MESSAGE_COLUMNS = [column.key for column in _msg.columns if column.key != "id"]
# Every column of a new message: its scalar default, else None (as row_of fills them).
_MESSAGE_DEFAULTS = {column.key: column.default.arg if column.default is not None and column.default.is_scalar
                     else None for column in _msg.columns}
_mappers_ready: list = []  # not empty once configure_mappers() ran (new_message)
INSERT_ATTACHMENTS = insert(_att).returning(_att.c.id, sort_by_parameter_order=True)
INSERT_ROWS = 40  # messages per multi-row INSERT: ~700 parameters, below SQLite's limit
_src = MessageSource.__table__
SOURCE_ROWS = 400  # message sources per multi-row INSERT: 800 parameters


def insert_messages(count: int):
    """The multi-row INSERT of ``count`` messages (parameters ``<column>_<i>``),
    RETURNING each row's id with its ``public_id`` (unique), which matches
    the two: the order of RETURNING rows is not promised."""
    rows = [{key: bindparam(f"{key}_{i}", type_=_msg.c[key].type) for key in _MESSAGE_COLUMNS}
            for i in range(count)]
    return insert(_msg).values(rows).returning(_msg.c.id, _msg.c.public_id)


def earlier_any(count: int):
    """The duplicate filter's look-up of ``count`` digests (``sha_<i>``, and
    ``since``): the same index, one seek per digest of a batch."""
    return select(_msg.c.id, _msg.c.raw_sha256, _msg.c.mailbox_id, _msg.c.tag, _msg.c.envelope_from).where(
        _msg.c.raw_sha256.in_([bindparam(f"sha_{i}", type_=_msg.c.raw_sha256.type) for i in range(count)]),
        _msg.c.received_at >= bindparam("since", type_=_msg.c.received_at.type))


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
                for addr in header_addresses(value):
                    if mailpolicy.parse_recipient(addr).domain in ours and addr.lower() not in found:
                        found.append(addr.lower())
        if found:
            return found
    return []


def header_addresses(value) -> list[str]:
    """The addresses of one header value; none for a value the lenient
    compat32 parser cannot read (it recurses once per "(": a To of a thousand
    nested comments raised RecursionError out of pipe and IMAP mode)."""
    try:
        return [addr for _, addr in email.utils.getaddresses([clean(value)])]
    except (RecursionError, ValueError, IndexError):
        return []


def headers_only(raw: bytes) -> EmailMessage:
    """The headers of ``raw``, read through the bounded path (``get_all`` gives
    at most 100 values of 16 KiB each), from its first MAX_PARSE_LINES lines."""
    return BytesParser(policy=PARSE_POLICY).parsebytes(raw[:line_extent(raw, MAX_PARSE_LINES)],
                                                       headersonly=True)


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
