"""One writer process per host, fed by the receiver processes.

With ``smtp.processes`` > 1 the receivers only speak SMTP and LMTP: each
message they take is handed over a Unix socket to one writer process, which
stores whatever has arrived from all of them in one group commit and sends
each receiver the final replies of its messages. Against a writer thread in
every receiver (bench/README "Session 6: SMTP"): bigger batches (a batch
costs ~0.55 ms of CPU whatever its size, then ~0.25 ms a message), no queue
between receivers for SQLite's write lock, and no GIL shared between a
receiver's network I/O and the writer's parsing and SQL.

The socket is made by the supervisor before it forks anything and lives as
long as it does, so a writer that dies is restarted on the same address and
the receivers' new connections wait in its backlog. Its name is random, in
Linux's abstract namespace (no file to leave behind), and the writer takes
connections only from processes of its own user (``SO_PEERCRED``).

Nothing lost: a receiver answers 250 only on the writer's reply, which it
sends after the durable commit (``store_batch``). A message whose reply
never comes, because the link broke or the writer died, is answered 451, so
its sender retries; a retry of a message that was committed after all is
found by the duplicate filter.

Frames, both ways: a fixed header (``struct``) and the fields' bytes.
"""
from __future__ import annotations

import logging
import marshal
import os
import secrets
import selectors
import signal
import socket
import struct
import time
from typing import Callable, Iterator, Optional

from salmon._vendor import asynchat

log = logging.getLogger("tempmail.smtpd")

# job id, queue id, then the lengths of: envelope sender, peer, recipients,
# the receiver's parse and digest of the message (``Job.fields`` and
# ``Job.sha``, marshalled; 0: none), message
JOB = struct.Struct("!Q12sHHIII")
REPLY = struct.Struct("!QH")  # job id, length of the reply line(s)
JOIN_BELOW = 64 * 1024  # a smaller message goes out in one send with its header
READ_SIZE = 256 * 1024
STOP_WAIT_SECONDS = 120.0  # at a stop: for the receivers to hand over and hear back
CONNECT_TIMEOUT = 2.0
SEND_TIMEOUT = 30.0


def new_address() -> str:
    """A fresh abstract-namespace address (Linux) for one daemon's writer."""
    return f"\0tempmail-writer-{os.getpid()}-{secrets.token_hex(8)}"


def listen(address: str) -> socket.socket:
    """The writer's listening socket, made by the supervisor before it forks."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(address)
    sock.listen(64)
    return sock


def _text(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def encode_job(job_id: int, job) -> list[bytes]:
    """A job's frame, as one piece or (a big message) as header and message."""
    sender, peer, recipients = _text(job.mail_from), _text(job.peer), _text("\n".join(job.recipients))
    # marshal: a dict of str, bytes, bool, None and lists and a str, made by
    # our own receiver from the parsed message, read only by the writer it
    # forked beside (SO_PEERCRED): never data from the network as it came.
    fields = marshal.dumps((job.fields, job.sha)) if job.fields is not None else b""
    head = JOB.pack(job_id, job.queue_id.encode("ascii"), len(sender), len(peer), len(recipients),
                    len(fields), len(job.raw)) + sender + peer + recipients + fields
    if len(job.raw) < JOIN_BELOW:
        return [head + job.raw]
    return [head, job.raw]


def encode_reply(job_id: int, reply: str) -> bytes:
    data = reply.encode("utf-8", "replace")[:65535]
    return REPLY.pack(job_id, len(data)) + data


class Frames:
    """Bytes in, whole frames out (``jobs()`` on the writer's side,
    ``replies()`` on a receiver's)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> None:
        self.buf += data

    def replies(self) -> Iterator[tuple[int, str]]:
        buf, start = self.buf, 0
        while len(buf) - start >= REPLY.size:
            job_id, size = REPLY.unpack_from(buf, start)
            end = start + REPLY.size + size
            if end > len(buf):
                break
            yield job_id, buf[start + REPLY.size:end].decode("utf-8", "replace")
            start = end
        del buf[:start]

    def jobs(self) -> Iterator[tuple[int, str, str, str, list, tuple, bytearray]]:
        """(job id, queue id, sender, peer, recipients, (parsed fields, digest)
        or (None, None), message) per whole frame."""
        while len(self.buf) >= JOB.size:
            job_id, queue_id, n_from, n_peer, n_rcpt, n_fields, n_raw = JOB.unpack_from(self.buf)
            start = JOB.size + n_from + n_peer + n_rcpt + n_fields
            if len(self.buf) < start + n_raw:
                return
            head = bytes(self.buf[JOB.size:start])
            if len(self.buf) == start + n_raw:  # the usual case for a big message: no copy
                raw, self.buf = self.buf, bytearray()
                del raw[:start]
            else:
                raw = self.buf[start:start + n_raw]
                del self.buf[:start + n_raw]
            # the lengths are of bytes: cut, then decode
            cuts = (0, n_from, n_from + n_peer, n_from + n_peer + n_rcpt)
            sender, peer, rcpts = (head[a:b].decode("utf-8", "surrogateescape") for a, b in zip(cuts, cuts[1:]))
            fields = marshal.loads(head[cuts[-1]:]) if n_fields else (None, None)
            yield (job_id, queue_id.decode("ascii"), sender, peer, rcpts.split("\n") if rcpts else [],
                   fields, raw)


# --------------------------------------------------------------------------
# the receiver's side

class WriterLink:
    """A receiver's link to the writer process, run by the receiver's I/O
    thread like its SMTP connections (no thread of its own, so no GIL to
    hand over): ``send`` pushes a message's frame from ``end_of_data``; the
    writer's replies are read by the same loop and resume each client.
    Every message handed over gets exactly one reply: the writer's, or
    ``failed`` when the link breaks before it comes."""

    def __init__(self, address: str, failed: str, sock_map: dict, resume: Callable, later: Callable) -> None:
        self.address, self.failed, self.map = address, failed, sock_map
        self.resume, self.later = resume, later  # reply now (I/O thread), reply on the next loop
        self.channel: Optional[WriterChannel] = None
        self.inflight: dict[int, object] = {}
        self.next_id = 0

    def connect(self) -> bool:
        """Connect now (at start, and again after a break; the socket's
        backlog takes us even while a new writer is starting)."""
        if self.channel is not None:
            return True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(self.address)
        except OSError as exc:
            log.error("cannot reach the writer process: %s", exc)
            sock.close()
            return False
        sock.setblocking(False)
        self.channel = WriterChannel(self, sock, self.map)
        return True

    def send(self, job) -> None:
        """Hand ``job`` over; without a writer to connect to, answer it 451
        (through ``later``: the client's own handler is still running)."""
        if not self.connect():
            job.reply = self.failed
            self.later(job)
            return
        self.next_id += 1
        self.inflight[self.next_id] = job
        for piece in encode_job(self.next_id, job):
            self.channel.push(memoryview(piece))

    def replied(self, job_id: int, reply: str) -> None:
        job = self.inflight.pop(job_id, None)
        if job is not None:
            job.reply = reply
            self.resume(job)

    def broken(self, channel: "WriterChannel") -> None:
        """The link ended: every message still waiting on it is answered
        ``failed``, and a new link is made for the next ones."""
        if channel is not self.channel:
            return
        self.channel, lost, self.inflight = None, self.inflight, {}
        if lost:
            log.error("the link to the writer process broke; %d messages answered 451", len(lost))
        for job in lost.values():  # maybe from within a client's own handler: on the next loop
            job.reply = self.failed
            self.later(job)
        self.connect()

    def close(self) -> None:
        if self.channel is not None:
            channel, self.channel = self.channel, None
            channel.close()


class WriterChannel(asynchat.async_chat):
    """The link's socket on the receiver's asyncore map: frames out through
    asynchat's queue (a big message in 64 KiB views, never copied), replies
    in through ``Frames``."""

    def __init__(self, link: WriterLink, sock: socket.socket, sock_map: dict) -> None:
        super().__init__(sock, map=sock_map)
        self.link, self.frames = link, Frames()

    def handle_read(self) -> None:
        data = self.recv(READ_SIZE)  # b"" and handle_close when the writer has gone
        if data:
            self.frames.feed(data)
            for job_id, reply in self.frames.replies():
                self.link.replied(job_id, reply)

    def handle_close(self) -> None:
        self.close()
        self.link.broken(self)

    def handle_error(self) -> None:
        log.exception("the link to the writer process failed")
        self.handle_close()


# --------------------------------------------------------------------------
# the writer process

class WriterService:
    """The writer process: takes jobs from every receiver, stores what has
    arrived in batches (``store(jobs)`` sets each job's reply), answers each
    receiver, and runs the purge timer. Single-threaded: while a batch is
    stored the next jobs wait in the sockets, and become the next batch."""

    def __init__(self, listener: socket.socket, make_job: Callable, store: Callable,
                 batch_messages: int, batch_bytes: int, purge: Callable, purge_interval: float) -> None:
        self.listener, self.make_job, self.store = listener, make_job, store
        self.batch_messages, self.batch_bytes = batch_messages, batch_bytes
        self.purge, self.purge_interval = purge, purge_interval
        self.selector = selectors.DefaultSelector()
        self.frames: dict[socket.socket, Frames] = {}
        self.stopping = False

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT and every receiver has gone."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "stopping", True))
        self.listener.setblocking(False)
        self.selector.register(self.listener, selectors.EVENT_READ)
        next_purge = time.monotonic() + self.purge_interval if self.purge_interval else None
        stop_by = None
        while True:
            if self.stopping and stop_by is None:
                stop_by = time.monotonic() + STOP_WAIT_SECONDS
                self.selector.unregister(self.listener)
            if stop_by is not None and (not self.frames or time.monotonic() > stop_by):
                return
            self.store_all(self.read_ready(0.5))
            if next_purge is not None and time.monotonic() >= next_purge:
                self.purge()
                next_purge = time.monotonic() + self.purge_interval

    def read_ready(self, timeout: float) -> list:
        """Accept new receivers and read every whole job that has arrived."""
        jobs = []
        for key, _events in self.selector.select(timeout):
            if key.fileobj is self.listener:
                self.accept()
                continue
            conn = key.fileobj
            try:
                data = conn.recv(READ_SIZE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                self.drop(conn)
                continue
            frames = self.frames[conn]
            frames.feed(data)
            for job_id, queue_id, sender, peer, recipients, (fields, sha), raw in frames.jobs():
                jobs.append(self.make_job(raw, recipients, sender, peer, (conn, job_id), queue_id, fields, sha))
        return jobs

    def accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except BlockingIOError:
            return
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():
            log.error("refused a connection to the writer from uid %d", uid)
            conn.close()
            return
        # Sends wait (replies are small) but not forever: a receiver that
        # stopped reading is dropped, not allowed to stall every other one.
        # Reads use MSG_DONTWAIT.
        conn.settimeout(SEND_TIMEOUT)
        self.frames[conn] = Frames()
        self.selector.register(conn, selectors.EVENT_READ)

    def drop(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        self.frames.pop(conn, None)
        conn.close()

    def store_all(self, jobs: list) -> None:
        """Store ``jobs`` in batches and send every reply to its receiver."""
        while jobs:
            batch, size = [], 0
            while jobs and len(batch) < self.batch_messages and (not batch or size < self.batch_bytes):
                batch.append(jobs.pop(0))
                size += len(batch[-1].raw)
            self.store(batch)
            self.answer(batch)

    def answer(self, batch: list) -> None:
        out: dict[socket.socket, list[bytes]] = {}
        for job in batch:
            conn, job_id = job.channel
            out.setdefault(conn, []).append(encode_reply(job_id, job.reply))
        for conn, frames in out.items():
            if conn not in self.frames:
                continue  # that receiver went away: its senders retry
            try:
                conn.sendall(b"".join(frames))
            except OSError as exc:
                log.error("could not answer a receiver: %s", exc)
                self.drop(conn)
