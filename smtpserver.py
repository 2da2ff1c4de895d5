"""The mail daemon behind ``flask smtpd``: Salmon's SMTP and LMTP receivers,
subclassed to mend what stock Salmon 3.3 gets wrong (SPEC "Receiving mail"):

* recipients are checked at RCPT time (550 5.7.1 / 550 5.1.1), several per
  transaction, without the deprecated attribute stock ``smtp_RCPT`` reads;
* 552 5.3.4 for ``SIZE=`` over the limit and for oversize DATA, after which
  the session goes on; the limit is the configured ``max_message_bytes``;
* 250 only once the message is durably stored, 451 when storing fails;
* TCP_NODELAY, a listen backlog of 128, the EHLO reply in one send, no DNS
  lookup per connection, a connection limit (421) and an idle timeout;
* LMTP undoes dot-stuffing (stock compares an int with ``b'.'``);
* DATA is gathered in one bytearray, not a list of lines joined and split
  again, so a 25 MiB message costs about two copies of itself.

One asyncore thread does all socket I/O; a writer thread runs ``deliver()``
for a batch of messages at a time and commits them together (one fsync pass
per batch), then hands the replies back through a wake-up pipe. Several
processes can share the port with SO_REUSEPORT (``smtp.processes``).
"""
from __future__ import annotations

import collections
import contextlib
import ctypes
import gc
import grp
import logging
import os
import queue
import re
import secrets
import signal
import socket
import sys
import threading
import time
from typing import Optional

import click
from flask import Flask, current_app
from flask.cli import with_appcontext
from salmon import server as salmon_server
from salmon._vendor import asynchat, asyncore, smtpd

import logsafe
import mailhandler
import mailpolicy
import mimeheaders
import retention
import storage
import walsync
import webhook_worker
import writerlink
from mailpolicy import DeliveryError, NoRoom, TooLarge
from models import db

log = logging.getLogger("tempmail.smtpd")

BACKLOG = 128
MAX_RECIPIENTS = 100
BATCH_MESSAGES = 64
BATCH_BYTES = 4 << 20
PARSE_IN_RECEIVER_BELOW = 1 << 20  # bytes: a bigger message is parsed by the writer (parses_here)
PARSE_WHEN_WAITING = 2  # smtp.receiver_parse "auto": this many of a receiver's messages wait for the writer
SIZE_PARAM = re.compile(r"\bSIZE=(\d+)", re.IGNORECASE)
# Reply lines of printable ASCII joined by CRLF: what SMTPChannel.push can send as they are.
PLAIN_REPLY = re.compile(r"[\x20-\x7e]*(?:\r\n[\x20-\x7e]*)*\Z")
PR_SET_PDEATHSIG = 1  # prctl(2)
PR_SET_NAME = 15  # prctl(2)
M_MMAP_THRESHOLD = -3  # mallopt(3)
MMAP_THRESHOLD = 1 << 20  # bytes; see fix_mmap_threshold
SWITCH_INTERVAL = 0.0005  # seconds; see MailServer.start
PURGE = object()  # a writer-queue item asking for a purge of expired mailboxes


class Job:
    """One received message waiting for the writer thread. ``fields`` and
    ``sha``: what ``mailhandler.parse_message`` made of it and its digest,
    when the receiver made them (``MailServer.parses_here``)."""
    __slots__ = ("raw", "recipients", "mail_from", "peer", "channel", "reply", "queue_id", "fields", "sha")

    def __init__(self, raw: bytes, recipients: list, mail_from: str, peer: str, channel,
                 queue_id: Optional[str] = None, fields: Optional[dict] = None, sha: Optional[str] = None):
        self.raw, self.recipients, self.mail_from = raw, recipients, mail_from
        self.peer, self.channel = peer, channel
        self.reply: Optional[str] = None
        # The writer process gets the receiver's queue id with the job: no new one.
        self.queue_id = queue_id or secrets.token_hex(6).upper()
        self.fields, self.sha = fields, sha


class SMTPChannel(salmon_server.SMTPChannel):
    """One SMTP connection. Salmon's channel with its weaknesses mended."""

    greeting = "ESMTP TempMail"

    def __init__(self, mail_server: "MailServer", conn: socket.socket, addr, sock_map: dict):
        # Replaces the stock __init__, which does a DNS lookup (getfqdn) per connection.
        asynchat.async_chat.__init__(self, conn, map=sock_map)
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.mail_server = self.smtp_server = mail_server
        self.conn, self.addr, self.peer = conn, addr, addr
        self.data_size_limit = mail_server.data_size_limit
        # SMTPUTF8 (RFC 6531) is offered; stock smtp_MAIL then takes the parameter.
        self.enable_SMTPUTF8, self._decode_data = True, False
        self._emptystring, self._linesep, self._dotsep, self._newline = b"", b"\r\n", ord(b"."), b"\n"
        # The stock limits dict is shared by every channel; one per connection here.
        self.command_size_limits = collections.defaultdict(lambda: smtpd.SMTPChannel.command_size_limit)
        self.buf = bytearray()
        self.pending, self.held = False, b""
        self.last_active = time.monotonic()
        self._set_rset_state()
        self.seen_greeting, self.extended_smtp = "", False
        self.fqdn = mail_server.fqdn
        self.push(f"220 {self.fqdn} {self.greeting}")

    @property
    def peer_text(self) -> str:
        return f"{self.peer[0]}:{self.peer[1]}" if isinstance(self.peer, tuple) else "unix"

    def _set_post_data_state(self) -> None:
        super()._set_post_data_state()
        self.buf = bytearray()

    # -- reading, with delivery pauses -----------------------------------
    def readable(self) -> bool:
        # While the writer stores a message, read nothing more: pipelined
        # commands wait until the reply for the message has been sent.
        return not self.pending

    def recv(self, size: int) -> bytes:
        if self.held:
            data, self.held = self.held, b""
            return data
        return super().recv(size)

    def handle_read(self) -> None:
        self.last_active = time.monotonic()
        super().handle_read()

    def push(self, msg: str) -> None:
        """Send ``msg`` (lines joined by CRLF) with nothing in it the session
        cannot carry: control characters, bare CR and LF among them, become
        visible escapes, and so does non-ASCII text unless the client asked
        for SMTPUTF8 in this transaction (stock push raised UnicodeEncodeError
        on an address like Ünï@ quoted in a refusal)."""
        if PLAIN_REPLY.match(msg):  # printable ASCII lines: nothing to escape (nearly every reply)
            asynchat.async_chat.push(self, (msg + "\r\n").encode("ascii"))
            return
        ascii_only = not self.require_SMTPUTF8
        lines = [logsafe.escape(line, ascii_only) for line in msg.split("\r\n")]
        asynchat.async_chat.push(self, ("\r\n".join(lines) + "\r\n").encode("utf-8"))

    def resume(self, reply: str) -> None:
        """Send the final reply of a stored (or refused) message, then go on
        with whatever the client pipelined behind it."""
        self.pending = False
        self.last_active = time.monotonic()
        self.push(reply)
        if self.held and self.connected:
            self.handle_read()

    def collect_incoming_data(self, data: bytes) -> None:
        if self.smtp_state != self.DATA:
            super().collect_incoming_data(data)
            return
        self.num_bytes += len(data)
        if self.num_bytes <= self.data_size_limit + 2:
            self.buf += data
        elif self.buf:
            self.buf = bytearray()  # over the limit: keep reading, stop keeping

    def found_terminator(self) -> None:
        if self.smtp_state == self.DATA:
            self.end_of_data()
            return
        line = self.received_lines[0] if len(self.received_lines) == 1 else b"".join(self.received_lines)
        if b"\r" in line or b"\n" in line:
            self.refuse_bare_line_break()
            return
        try:
            super().found_terminator()
        except Exception as exc:  # undecodable command line, broken address syntax...
            self.received_lines = []
            log.debug("bad command from %s: %r", self.peer_text, exc)
            self.push("501 5.5.2 Syntax error")

    def refuse_bare_line_break(self) -> None:
        """A command holding a CR or LF that is not part of its CRLF: refused
        whole (RFC 5321 2.3.8), so no part of it can pass for a line of its own."""
        line = b"".join(self.received_lines)
        self.received_lines, self.num_bytes = [], 0
        log.info("refused command with a bare CR or LF from %s: %s", self.peer_text,
                 logsafe.escape(line[:200].decode("utf-8", "replace")))  # also where no filter is installed
        self.push("501 5.5.2 Syntax error: bare CR or LF in command")

    def handle_error(self) -> None:
        log.exception("connection from %s failed", self.peer_text)
        self.close()

    def close(self) -> None:
        self.mail_server.channels.discard(self)
        super().close()

    # -- commands --------------------------------------------------------
    def ehlo_lines(self) -> list[str]:
        return [self.fqdn, f"SIZE {self.data_size_limit}", "8BITMIME", "SMTPUTF8", "PIPELINING", "HELP"]

    def smtp_EHLO(self, arg: Optional[str]) -> None:
        if not arg:
            self.push("501 Syntax: EHLO hostname")
            return
        if self.seen_greeting:
            self.push("503 Duplicate HELO/EHLO")
            return
        self._set_rset_state()
        self.seen_greeting, self.extended_smtp = arg, True
        self.command_size_limits["MAIL"] += 26 + 10  # SIZE= and SMTPUTF8 (RFC 1870, RFC 6531)
        lines = self.ehlo_lines()
        # One send for the whole reply: several small writes cost a delayed ACK each.
        self.push("\r\n".join([f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]))

    def _getaddr(self, arg: str) -> tuple:
        """(address, the rest of the line) of a MAIL or RCPT argument. A plain
        ``<user@example.com>`` is read by a pattern that gives what the stock
        parser gives (tests/test_smtp_protocol.py compares them); the rest
        goes through the stdlib's address parser, once per command."""
        match = mimeheaders.PLAIN_ENVELOPE.match(arg or "")
        rest = arg[match.end():].lstrip(" \t") if match is not None else ""
        if match is not None and not rest.startswith("("):  # a comment: the stock parser drops it
            return match.group(1), rest
        return super()._getaddr(arg)

    def smtp_MAIL(self, arg: Optional[str]) -> None:
        if self.seen_greeting and not self.mailfrom and not storage.has_room():
            # Below the free-space floor: the sender keeps the mail queued
            # instead of sending data we could not keep (RFC 5321 452).
            self.refuse(NoRoom(), arg or "", [], 0)
            return
        size = SIZE_PARAM.search(arg or "")
        if size and self.seen_greeting and not self.mailfrom and int(size.group(1)) > self.data_size_limit:
            exc = TooLarge(f"Message size exceeds fixed maximum message size ({self.data_size_limit})")
            mailhandler.log_rejected(exc, arg or "", [], int(size.group(1)), self.peer_text)
            self.push(exc.smtp_reply)
            return
        address, _ = self._getaddr(self._strip_command_keyword("FROM:", arg or ""))
        if logsafe.UNSAFE.search(address or ""):
            self.push("501 5.1.7 Bad sender address syntax")  # RFC 5321 4.1.2: no controls
            return
        super().smtp_MAIL(arg)

    def smtp_RCPT(self, arg: Optional[str]) -> None:
        if not self.seen_greeting:
            self.push("503 Error: send HELO first")
            return
        if not self.mailfrom:
            self.push("503 Error: need MAIL command")
            return
        address, params = self._getaddr(self._strip_command_keyword("TO:", arg or ""))
        if not address:
            self.push("501 Syntax: RCPT TO: <address>")
        elif logsafe.UNSAFE.search(address):
            self.push("501 5.1.3 Bad recipient address syntax")  # RFC 5321 4.1.2: no controls
        elif params.strip():
            self.push("555 RCPT TO parameters not recognized or not implemented")
        elif len(self.rcpttos) >= MAX_RECIPIENTS:
            self.push("452 4.5.3 Too many recipients")
        else:
            self.check_and_add(ascii_domain(address))

    def refuse(self, exc: DeliveryError, mail_from: str, recipients: list, size: int) -> None:
        mailhandler.log_rejected(exc, mail_from, recipients, size, self.peer_text)
        self.push(exc.smtp_reply)

    def check_and_add(self, address: str) -> None:
        try:
            if not storage.has_room():
                raise NoRoom()
            mailpolicy.check_recipient(address)
        except DeliveryError as exc:
            self.refuse(exc, self.mail_from_text, [address], 0)
            return
        except Exception:
            log.exception("recipient check failed for %s", address)
            self.push("451 4.3.0 Temporary failure checking the recipient, try again later")
            return
        self.rcpttos.append(address)
        self.push("250 2.1.5 OK")

    @property
    def mail_from_text(self) -> str:
        return "" if self.mailfrom in (None, "<>") else str(self.mailfrom)

    def smtp_DATA(self, arg: Optional[str]) -> None:
        super().smtp_DATA(arg)
        if self.smtp_state == self.DATA:
            # The CRLF that ended the DATA line starts the data stream, so an
            # empty message and a dot-stuffed first line need no special case.
            self.ac_in_buffer = b"\r\n" + self.ac_in_buffer
            self.num_bytes, self.buf = 0, bytearray()

    def end_of_data(self) -> None:
        """The final dot arrived: refuse an oversize message (and go on with
        the session), else hand the unstuffed bytes to the writer thread."""
        if self.num_bytes > self.data_size_limit + 2:
            exc = TooLarge(f"Message size exceeds fixed maximum message size ({self.data_size_limit})")
            mailhandler.log_rejected(exc, self.mail_from_text, self.rcpttos, self.num_bytes - 2,
                                     self.peer_text)
            self._set_post_data_state()
            self.push(exc.smtp_reply)
            return
        buf, self.buf = self.buf, bytearray()
        buf += b"\r\n"
        if b"\r\n." in buf:
            buf = buf.replace(b"\r\n.", b"\r\n")  # RFC 5321 4.5.2: drop the leading dot
        del buf[:2]
        # The bytearray itself is the message: no further copy of a big one.
        job = Job(buf, list(self.rcpttos), self.mail_from_text, self.peer_text, self)
        self._set_post_data_state()
        self.pending = True
        self.held, self.ac_in_buffer = self.ac_in_buffer, b""
        self.mail_server.submit(job)


def ascii_domain(address: str) -> str:
    """``address`` with an internationalised domain (RFC 6531 allows U-labels
    in the envelope) in its A-label form, the form configured domains take;
    unchanged when it is ASCII already or not a valid IDN."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii():
        return address
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return address


class LMTPChannel(SMTPChannel):
    """LMTP (RFC 2033) on the same code: LHLO instead of HELO/EHLO and one
    reply per accepted recipient after DATA."""

    greeting = "LMTP TempMail"

    def smtp_LHLO(self, arg: Optional[str]) -> None:
        SMTPChannel.smtp_EHLO(self, arg)

    def smtp_EHLO(self, arg: Optional[str]) -> None:
        self.push("500 5.5.1 Error: use LHLO")

    smtp_HELO = smtp_EHLO

    def end_of_data(self) -> None:
        self.recipient_count = len(self.rcpttos)
        super().end_of_data()

    def push(self, msg: str) -> None:
        # After DATA the one reply of the writer goes out once per recipient.
        count = getattr(self, "recipient_count", 0)
        if count and not msg.startswith("354"):
            self.recipient_count = 0
            msg = "\r\n".join([msg] * count)
        super().push(msg)


class SMTPReceiver(salmon_server.SMTPReceiver):
    """Salmon's SMTP listener on a private socket map, with a real backlog,
    optional SO_REUSEPORT and the configured size limit."""

    def __init__(self, mail_server: "MailServer", host: str, port: int, reuse_port: bool):
        self.mail_server, self.reuse_port = mail_server, reuse_port
        self.host = host
        smtpd.SMTPServer.__init__(self, (host, port), None, data_size_limit=mail_server.data_size_limit,
                                  map=mail_server.map)
        self.port = self.socket.getsockname()[1]

    def set_reuse_addr(self) -> None:
        super().set_reuse_addr()
        if self.reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)

    def listen(self, num: int) -> None:
        asyncore.dispatcher.listen(self, max(num, BACKLOG))  # stock Salmon: listen(5)

    def handle_accept(self) -> None:
        for _ in range(32):  # drain a burst of connections per wake-up
            pair = self.accept()
            if pair is None:
                return
            self.mail_server.accepted(SMTPChannel, *pair)

    def close(self) -> None:
        asyncore.dispatcher.close(self)  # the stock close() only logs


class LMTPReceiver(salmon_server.LMTPReceiver):
    """Salmon's LMTP listener on a Unix socket, speaking through LMTPChannel."""

    def __init__(self, mail_server: "MailServer", path: str):
        self.mail_server, self.socket_path = mail_server, path
        asyncore.dispatcher.__init__(self, map=mail_server.map)
        if os.path.exists(path):
            os.unlink(path)  # left over from a daemon that was killed
        self.create_socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.bind(path)
        # Before listen(): until then a connect() is refused, whatever the
        # mode the umask gave the new socket file.
        try:
            set_socket_access(path, mail_server.app.config["TEMPMAIL"].get("lmtp") or {})
        except ValueError:
            self.close()
            raise
        self.listen(BACKLOG)

    def handle_accept(self) -> None:
        pair = self.accept()
        if pair is not None:
            self.mail_server.accepted(LMTPChannel, *pair)

    def close(self) -> None:
        asyncore.dispatcher.close(self)
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)


def socket_access(conf: dict) -> tuple[int, int]:
    """(mode, gid) for the LMTP socket from ``lmtp.mode`` (an octal string,
    default "0660") and ``lmtp.group`` (a group name or id; null: the
    daemon's own group). Raises ValueError naming the key."""
    mode, group = conf.get("mode", "0660"), conf.get("group")
    if not isinstance(mode, str) or not re.fullmatch(r"0?[0-7]{3}", mode):
        raise ValueError(f'lmtp.mode must be an octal string such as "0660", not {mode!r}')
    if group is None:
        return int(mode, 8), os.getegid()
    try:
        if isinstance(group, str):
            return int(mode, 8), grp.getgrnam(group).gr_gid
        if isinstance(group, int) and not isinstance(group, bool):
            return int(mode, 8), grp.getgrgid(group).gr_gid
    except (KeyError, OverflowError):
        pass
    raise ValueError(f"lmtp.group: no such group {group!r}")


def set_socket_access(path: str, conf: dict) -> None:
    """Give the socket file the configured group and mode, so that Postfix
    (in that group) can connect however the daemon was started: by systemd
    with a UMask, or by hand as root, where the umask leaves it 0755."""
    mode, gid = socket_access(conf)
    try:
        os.chown(path, -1, gid)
    except PermissionError as exc:
        raise ValueError(f"lmtp.group: this daemon may not give {path} to group {gid}: {exc}") from exc
    os.chmod(path, mode)


class Wakeup(asyncore.file_dispatcher):
    """The read end of the pipe the writer thread pokes when replies are ready."""

    def __init__(self, fd: int, mail_server: "MailServer"):
        super().__init__(fd, map=mail_server.map)
        self.mail_server = mail_server

    def writable(self) -> bool:
        return False

    def handle_read(self) -> None:
        try:
            os.read(self._fileno, 4096)
        except BlockingIOError:
            pass
        self.mail_server.send_replies()

    def handle_error(self) -> None:
        # asyncore's default closes the dispatcher, and without the pipe no
        # client would get a reply after DATA again: log and keep it open.
        log.exception("answering after DATA failed")


class MailServer:
    """SMTP (and optionally LMTP) receiver plus writer thread and purge timer,
    startable in-process: ``MailServer(app, "127.0.0.1", 0).start()``; the
    bound port is ``.port``."""

    def __init__(self, app: Flask, host: str = "127.0.0.1", port: int = 0,
                 lmtp_socket: Optional[str] = None, reuse_port: bool = False, purge: bool = True,
                 writer_address: Optional[str] = None):
        conf = app.config["TEMPMAIL"]
        smtp_conf = conf["smtp"]
        self.app, self.host = app, host
        self.data_size_limit = int(conf["max_message_bytes"])
        self.max_connections = int(smtp_conf["max_connections"])
        self.idle_timeout = float(smtp_conf["idle_timeout"])
        self.purge_interval = float(smtp_conf["purge_interval"]) if purge else 0
        self.fqdn = smtp_conf["hostname"] or socket.gethostname()
        self.receiver_parse = smtp_conf["receiver_parse"]
        self.map: dict = {}
        self.channels: set = set()
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.replies: collections.deque = collections.deque()
        self.running = self.draining = False
        wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.wakeup = Wakeup(wake_r, self)
        os.close(wake_r)  # the dispatcher works on its own duplicate
        self.smtp = SMTPReceiver(self, host, port, reuse_port)
        self.port = self.smtp.port
        self.lmtp = LMTPReceiver(self, lmtp_socket) if lmtp_socket else None
        self.threads: list[threading.Thread] = []
        # With a writer process (writerlink.py) this receiver has no writer
        # thread: the I/O thread hands each message over and reads the replies.
        self.link = (writerlink.WriterLink(writer_address, mailhandler.StoreFailed().smtp_reply, self.map,
                                           self.resume, self.answer) if writer_address else None)

    # -- lifecycle ---------------------------------------------------------
    def start(self) -> "MailServer":
        self.running = True
        loops = [(self.io_loop, "smtpd-io")]
        if self.link is None:
            loops.append((self.writer_loop, "smtpd-writer"))
        for target, name in loops:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self.threads.append(thread)
        log.info("SMTP receiver on %s:%d%s", self.host, self.port,
                 f", LMTP on {self.lmtp.socket_path}" if self.lmtp else "")
        return self

    def stop(self) -> None:
        """Stop accepting, store and answer the messages already received,
        then close every connection."""
        io_thread, writer = (self.threads + [None, None])[:2]
        self.draining = True
        self.poke()
        self.jobs.put(None)
        if writer is not None:
            writer.join(timeout=writerlink.STOP_WAIT_SECONDS)
        if self.link is not None and io_thread is not None:
            deadline = time.monotonic() + writerlink.STOP_WAIT_SECONDS
            while self.link.inflight and time.monotonic() < deadline:
                time.sleep(0.01)  # the writer process answers what was handed over
        self.running = False
        self.poke()
        if io_thread is not None:
            io_thread.join(timeout=30)
        else:
            asyncore.close_all(map=self.map)
        os.close(self._wake_w)

    def poke(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full, so a wake-up is pending anyway

    def serve_forever(self) -> None:
        """Run until SIGINT or SIGTERM (``flask smtpd``).

        The signals are blocked (before the threads start, so they inherit
        that) and taken with ``sigwait``, not handled: a handler calling
        ``Event.set()`` deadlocked on the Event's lock when a second signal
        (Ctrl-C to the group, then TERM from ``make run``) arrived while the
        main thread was waking up from the first; a signal during ``stop()``
        stays pending and is dropped at exit."""
        signals = {signal.SIGINT, signal.SIGTERM}
        signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        self.start()
        signal.sigwait(signals)
        self.stop()

    # -- I/O thread ------------------------------------------------------
    def io_loop(self) -> None:
        name_os_thread("smtpd-io")
        with self.app.app_context():
            if self.link is not None:
                self.link.connect()  # before any mail: a stopping writer waits for this receiver
            next_tick = time.monotonic() + 1
            next_purge = time.monotonic() + self.purge_interval
            while self.running:
                asyncore.loop(timeout=1.0, use_poll=True, map=self.map, count=1)
                if self.draining and self.smtp.accepting:
                    self.close_listeners()
                now = time.monotonic()
                if now >= next_tick:
                    self.close_idle(now)
                    if self.link is not None:
                        self.link.connect()  # a link that could not be made again at once
                    next_tick = now + 1
                if self.purge_interval and now >= next_purge:
                    self.jobs.put(PURGE)
                    next_purge = now + self.purge_interval
            self.send_replies()
            for channel in list(self.channels):
                if channel.pending:  # arrived after the writer stopped: the sender retries
                    channel.push("421 4.3.2 Shutting down, try again later")
                    channel.initiate_send()
            asyncore.close_all(map=self.map)
            db.session.remove()

    def close_listeners(self) -> None:
        self.smtp.close()
        if self.lmtp is not None:
            self.lmtp.close()

    def accepted(self, channel_class, conn: socket.socket, addr) -> None:
        """A new connection: a channel for it, or 421 beyond the connection limit."""
        if len(self.channels) >= self.max_connections:
            log.info("rejected connection from %s: 421 too many connections", addr)
            try:
                conn.send(b"421 4.7.0 Too many connections, try again later\r\n")
            except OSError:
                pass
            conn.close()
            return
        self.channels.add(channel_class(self, conn, addr, self.map))

    def close_idle(self, now: float) -> None:
        for channel in list(self.channels):
            if not channel.pending and now - channel.last_active > self.idle_timeout:
                log.info("closing idle connection from %s", channel.peer_text)
                channel.push("421 4.4.2 Idle timeout, closing connection")
                channel.close_when_done()
                self.channels.discard(channel)

    def submit(self, job: Job) -> None:
        if self.link is not None:
            if self.parses_here(job):
                job.fields, job.sha = mailhandler.shipped(mailhandler.parse_message(job.raw)), storage.digest(job.raw)
            self.link.send(job)
        else:
            self.jobs.put(job)

    def parses_here(self, job: Job) -> bool:
        """Whether this receiver parses and digests ``job`` for the writer
        (``smtp.receiver_parse``).

        The one writer process is what every receiver waits on when mail
        comes fast: parsing a 2 KB message was ~11 % of its time, the
        SHA-256 of a 100 KB one ~6 %. Parsed here it costs the receiver more
        than it saves the writer, which pays only while the writer is the
        bottleneck, so "auto" parses here only while the writer is behind
        (two or more of this receiver's messages waiting). Against "always", same run: reused connections
        1,441 vs 1,493 msg/s, a new connection per message 1,198 vs 1,115
        (bench/README "Session 7"). A big message goes as it came: parsed
        and marshalled here it would cost a receiver more memory than the
        writer's parse."""
        mode = self.receiver_parse
        if mode == "never" or len(job.raw) > PARSE_IN_RECEIVER_BELOW:
            return False
        return mode == "always" or len(self.link.inflight) >= PARSE_WHEN_WAITING

    def answer(self, job: Job) -> None:
        """Queue ``job``'s final reply for the I/O thread (from any thread)."""
        self.replies.append(job)
        self.poke()

    def resume(self, job: Job) -> None:
        """Give ``job``'s client its final reply now (on the I/O thread)."""
        try:
            job.channel.resume(job.reply)
        except Exception:  # that client's trouble closes that client, not the loop or the wake-up pipe
            job.channel.handle_error()

    def send_replies(self) -> None:
        while self.replies:
            self.resume(self.replies.popleft())

    # -- writer thread -----------------------------------------------------
    def writer_loop(self) -> None:
        name_os_thread("smtpd-writer")
        with self.app.app_context():
            while True:
                batch = self.next_batch()
                if batch is None:
                    break
                if batch is PURGE:
                    purge_expired()
                    continue
                settle(batch)
                for job in batch:
                    self.answer(job)
            db.session.remove()

    def next_batch(self):
        """The next purge request, or up to BATCH_MESSAGES queued messages
        (BATCH_BYTES at most, unless one message alone is larger)."""
        first = self.jobs.get()
        if first is None or first is PURGE:
            return first
        batch, size = [first], len(first.raw)
        while len(batch) < BATCH_MESSAGES and size < BATCH_BYTES:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None or job is PURGE:
                self.jobs.put(job)  # handled on the next round
                break
            batch.append(job)
            size += len(job.raw)
        return batch


def purge_expired() -> None:
    """The purge timer's pass (the daemon's writer, thread or process)."""
    try:
        retention.run_purge(orphans=False, trim=False)
    except Exception:
        db.session.rollback()
        log.exception("purge failed")


def settle(jobs: list[Job]) -> None:
    """Store ``jobs`` and give each its final reply, whatever happens."""
    try:
        store_batch(jobs)
    except Exception:  # never leave a client without its answer
        log.exception("writer failed")
    for job in jobs:
        job.reply = job.reply or mailhandler.StoreFailed().smtp_reply


def store_batch(jobs: list[Job]) -> None:
    """Group commit: stage every job in one ``DeliveryBatch`` and commit it
    with one sync pass; if that fails, store them one by one so one bad
    message cannot cost the others. Sets each job's final SMTP reply.

    Within the batch, earlier copies (the duplicate filter) are looked up
    in one query, the domains and the mailboxes of all recipients in
    another, the rows of all messages go in multi-row INSERTs, and the
    stats counter gets one UPDATE."""
    batch = mailhandler.DeliveryBatch(attach=False)  # its messages are only logged
    staged: list[tuple[Job, list]] = []
    shas = [job.sha or storage.digest(job.raw) for job in jobs]
    try:
        batch.look_up_earlier(shas)
        batch.look_up_recipients([rcpt for job in jobs for rcpt in job.recipients])
        for job, sha in zip(jobs, shas):
            try:
                staged.append((job, mailhandler.deliver(job.raw, job.recipients, job.mail_from,
                                                        job.peer, batch=batch, sha=sha, fields=job.fields)))
            except DeliveryError as exc:
                if batch.failed:
                    raise mailhandler.StoreFailed() from exc  # all staged work is gone: again below
                job.reply = exc.smtp_reply
        batch.commit()
    except mailhandler.StoreFailed as exc:
        if isinstance(exc.__cause__, walsync.NotDurable):
            # Committed, not durable: one by one each would be found by the
            # duplicate filter and wait for the same checkpoint (walsync.py).
            for job in jobs:  # a refusal stands
                job.reply = job.reply or mailhandler.StoreFailed().smtp_reply
            return
        log.warning("group commit of %d messages failed; storing them one by one", len(jobs))
        store_singly(jobs)
        return
    for job, msgs in staged:
        job.reply = accepted_reply(job)
        mailhandler.log_accepted(mailhandler.describe(msgs, job.peer, job.queue_id))
    for job in jobs:
        job.raw = b""


def accepted_reply(job: Job) -> str:
    # A queue id of our own, not a message id: the reply must reveal nothing
    # about other mail (how much arrives, which ids api.php will show).
    return f"250 2.0.0 Ok: queued as {job.queue_id}"


def store_singly(jobs: list[Job]) -> None:
    for job in jobs:
        if job.reply is not None and not job.reply.startswith("250"):
            continue  # refused before anything was written: the refusal stands
        try:
            msgs = mailhandler.deliver(job.raw, job.recipients, job.mail_from, job.peer)
            job.reply = accepted_reply(job)
            log.debug("queue %s stored as %s", job.queue_id, [m.id for m in msgs])
        except DeliveryError as exc:
            job.reply = exc.smtp_reply
        except Exception:
            log.exception("storing a message failed")
            job.reply = mailhandler.StoreFailed().smtp_reply
        job.raw = b""


# --------------------------------------------------------------------------
# flask smtpd

def serve(app: Flask, host: str, port: int, lmtp_socket: Optional[str], reuse_port: bool,
          purge: bool = True, writer_address: Optional[str] = None) -> None:
    """Run one receiver process until SIGINT or SIGTERM (its own writer
    thread, or handing mail to the writer process at ``writer_address``)."""
    # The I/O and writer threads hand the GIL to each other around every
    # syscall; with the default 5 ms switch interval a thread coming back
    # from a send() or an fsync() waits up to 5 ms for the other one. Set
    # here, where a daemon process starts, not by building a MailServer.
    sys.setswitchinterval(SWITCH_INTERVAL)
    fix_mmap_threshold()
    server = MailServer(app, host, port, lmtp_socket=lmtp_socket, reuse_port=reuse_port, purge=purge,
                        writer_address=writer_address)
    # What the process built to get here lives as long as it does: keep the
    # garbage collector's full passes off it (deploy/gunicorn.conf.py says
    # what that cost the web workers).
    gc.freeze()
    with webhook_sender(app, purge):
        server.serve_forever()


@contextlib.contextmanager
def webhook_sender(app: Flask, wanted: bool):
    """Webhook events go out from the process that commits mail and runs the
    purge timer: one sender per daemon, woken by each commit."""
    sender = webhook_worker.Worker(app).start() if wanted else None
    try:
        yield
    finally:
        if sender is not None:
            sender.stop()


def run_writer(app: Flask, listener: socket.socket) -> None:
    """Run the writer process of a ``Supervisor`` (writerlink.py) until
    SIGINT or SIGTERM and every receiver has handed over its last mail."""
    name_os_thread("smtpd-writer")  # the one thread that stores, as in a receiver of its own
    fix_mmap_threshold()
    service = writerlink.WriterService(
        listener, Job, settle, BATCH_MESSAGES, BATCH_BYTES, purge_expired,
        float(app.config["TEMPMAIL"]["smtp"]["purge_interval"]))
    walsync.checkpoint_in_background(db.engine)
    gc.freeze()
    with webhook_sender(app, True):
        service.run()


class Supervisor:
    """``smtp.processes`` > 1: the parent serves nothing itself. It forks one
    writer process (writerlink.py: stores the mail of every receiver, runs
    the purge timer and the webhook sender) and the receivers (sharing the
    port with SO_REUSEPORT; the first one also runs LMTP), restarts any that
    dies with an exponential back-off, logs why it died, and stops them all
    on SIGINT/SIGTERM. The writer's socket is made here, before any fork, so
    a restarted writer serves the same address. Having no threads of its
    own, the parent can fork safely at any time."""

    MIN_BACKOFF, MAX_BACKOFF, STABLE = 1.0, 60.0, 60.0

    def __init__(self, app: Flask, host: str, port: int, count: int, lmtp_socket: Optional[str]):
        self.app, self.host, self.port, self.count, self.lmtp_socket = app, host, port, count, lmtp_socket
        self.writer_slot = count  # receivers are slots 0 .. count - 1
        self.address = writerlink.new_address()
        self.listener = writerlink.listen(self.address)
        self.pids: dict[int, int] = {}  # pid -> slot
        self.started: dict[int, float] = {}
        self.backoff = {slot: self.MIN_BACKOFF for slot in range(count + 1)}
        self.due: dict[int, float] = {}  # slot -> when to restart it
        self.stopping = False

    def name(self, slot: int) -> str:
        return "writer process" if slot == self.writer_slot else f"receiver process {slot}"

    def spawn(self, slot: int) -> None:
        db.engine.dispose()  # no connection shared with a child
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                die_with(parent)
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                with self.app.app_context():
                    self.child(slot)
            except BaseException:
                log.exception("%s failed", self.name(slot))
                code = 1
            finally:
                os._exit(code)
        self.pids[pid], self.started[slot] = slot, time.monotonic()

    def child(self, slot: int) -> None:
        if slot == self.writer_slot:
            run_writer(self.app, self.listener)
            return
        self.listener.close()  # a receiver connects to it; only the writer accepts
        serve(self.app, self.host, self.port, self.lmtp_socket if slot == 0 else None, True,
              purge=False, writer_address=self.address)

    def reaped(self, pid: int, status: int) -> None:
        """A child ended: log why and schedule its restart."""
        slot = self.pids.pop(pid)
        why = (f"killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
               else f"exited with status {os.waitstatus_to_exitcode(status)}")
        if time.monotonic() - self.started[slot] > self.STABLE:
            self.backoff[slot] = self.MIN_BACKOFF  # it had been running fine
        delay = self.backoff[slot]
        self.backoff[slot] = min(self.MAX_BACKOFF, delay * 2)
        self.due[slot] = time.monotonic() + delay
        log.error("%s (pid %d) %s; restarting it in %.0f s", self.name(slot), pid, why, delay)

    def run(self) -> None:
        """Supervise until SIGINT/SIGTERM, then stop every child gracefully."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: setattr(self, "stopping", True))
        for slot in range(self.count + 1):
            self.spawn(slot)
        while not self.stopping:
            self.reap_and_restart()
            time.sleep(0.2)
        self.stop_all()

    def reap_and_restart(self) -> None:
        while self.pids:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            if pid in self.pids:
                self.reaped(pid, status)
        for slot, when in list(self.due.items()):
            if time.monotonic() >= when:
                del self.due[slot]
                self.spawn(slot)

    def stop_all(self) -> None:
        """SIGTERM to every child; the writer answers what the receivers
        hand over while they stop, then ends when the last one has gone."""
        for pid in list(self.pids):
            os.kill(pid, signal.SIGTERM)
        for pid in list(self.pids):
            os.waitpid(pid, 0)
        self.listener.close()


def libc(function: str, *args) -> bool:
    """Call the C library's ``function`` (prctl, mallopt); False where this
    system's C library has no such function."""
    try:
        getattr(ctypes.CDLL(None), function)(*args)
    except (OSError, AttributeError):
        return False
    return True


def die_with(parent: int) -> None:
    """End this receiver when its supervisor ends, however it ends (a
    SIGKILL included): a receiver left behind would go on taking mail on
    the shared port, unsupervised, beside a restarted daemon."""
    if not libc("prctl", PR_SET_PDEATHSIG, signal.SIGKILL):
        return  # not Linux: the supervisor's SIGTERM still stops it
    if os.getppid() != parent:  # the supervisor died before the prctl
        os._exit(1)


def fix_mmap_threshold(size: int = MMAP_THRESHOLD) -> None:
    """Make glibc serve every allocation of ``size`` bytes or more by its own
    mmap, given back to the system when freed. By default the threshold
    rises to the largest block freed so far (up to 32 MiB), after which a big
    message's buffers stay in the heap and pile up: the MIME tests' 25 MB
    bombs peaked at up to +210-223 MiB over the idle daemon in most runs and
    +160-170 MiB in others; with the threshold fixed, +87 to +160 MiB in
    every run. Small messages never allocate that much at once."""
    libc("mallopt", M_MMAP_THRESHOLD, size)  # not glibc: nothing to fix


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` in the kernel too, so ``top -H``, ``ps
    -L`` and /proc/PID/task/*/comm tell the I/O thread from the writer."""
    libc("prctl", PR_SET_NAME, name.encode()[:15])  # not Linux: unnamed


def receiver_count(wanted: Optional[int], port: int) -> int:
    """How many receiver processes to run: as configured, else one per core
    (measured on 2 cores: two receivers stored 37-62 % more mail than one,
    bench/README session 3), but one on port 0, a free port that only one
    process can have."""
    if wanted:
        return max(1, int(wanted))
    return 1 if port == 0 else max(1, os.cpu_count() or 1)


@click.command("smtpd")
@click.option("--host", help="Address to listen on (default: smtp.host of the config).")
@click.option("--port", type=int, help="Port to listen on (default: smtp.port of the config).")
@click.option("--processes", type=int, help="Receiver processes sharing the port (smtp.processes).")
@with_appcontext
def smtpd_command(host: Optional[str], port: Optional[int], processes: Optional[int]) -> None:
    """Run the mail daemon: SMTP, LMTP when lmtp.socket is set, and the purge timer."""
    app = current_app._get_current_object()
    conf = app.config["TEMPMAIL"]
    host = host or conf["smtp"]["host"]
    port = port if port is not None else int(conf["smtp"]["port"])
    processes = receiver_count(processes or conf["smtp"]["processes"], port)
    lmtp_socket = conf["lmtp"]["socket"]
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logsafe.install()  # control characters escaped in every line the daemon logs
    if port == 0 and processes > 1:
        raise click.BadParameter("several processes need a fixed port", param_hint="--port")
    click.echo(f"TempMail mail daemon: SMTP on {host}:{port}"
               + (f", LMTP on {lmtp_socket}" if lmtp_socket else "")
               + (f", {processes} receiver processes and one writer process" if processes > 1 else ""))
    if processes > 1:
        Supervisor(app, host, port, processes, lmtp_socket).run()
    else:
        serve(app, host, port, lmtp_socket, reuse_port=False)
