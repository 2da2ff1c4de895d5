"""SMTP load for the bench: Postfix's ``smtp-source`` for 2 KB messages, and a
small asyncio client for 100 KB messages with an attachment.

``smtp-source -F file`` sends the very same bytes every time, which the
duplicate filter that ships on (``dedupe_window_seconds``) rightly stores
once: that would measure the filter's hit path, not storing mail. So the
100 KB load comes from this client, which sends a *different* message each
time (its own Message-ID, Subject and attachment bytes), each one a
``multipart/mixed`` with a text part and a ~75 KB binary file in base64.
smtp-source's own 2 KB messages already differ (Date, Message-Id).

As a script (its own process, so its CPU is not the bench's):
``python bench/smtpload.py --port P --rcpt R --messages N [--sessions 8] [--reuse]``
prints ``sent=N ok=M seconds=S``.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

POOL = os.urandom(1 << 20)
ATTACH_BYTES = 100 * 1024 * 3 // 4 - 600  # ~100 KB on the wire with headers and base64


def attachment_message(rcpt: str, n: int, nonce: str) -> bytes:
    """Message ``n``: unique headers and attachment bytes, ~100 KB."""
    start = (n * 7919) % (len(POOL) - ATTACH_BYTES)
    payload = base64.encodebytes(POOL[start:start + ATTACH_BYTES]).replace(b"\n", b"\r\n")
    head = (f"From: Bench Sender <sender@source.test>\r\nTo: {rcpt}\r\n"
            f"Subject: =?utf-8?q?Report_{n}_=E2=9C=93?=\r\n"
            f"Message-ID: <{nonce}.{n}@source.test>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n"
            "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            f"Report number {n} is attached.\r\n\r\n"
            f"--b1\r\nContent-Type: application/octet-stream; name=\"report-{n}.bin\"\r\n"
            f"Content-Disposition: attachment; filename=\"report-{n}.bin\"\r\n"
            "Content-Transfer-Encoding: base64\r\n\r\n")
    return head.encode() + payload + b"--b1--\r\n"


async def reply(reader: asyncio.StreamReader) -> int:
    """Read one (possibly multi-line) SMTP reply; its code."""
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return int(line[:3])


async def command(reader, writer, line: bytes) -> int:
    writer.write(line)
    return await reply(reader)


class Counter:
    def __init__(self, total: int, deadline: float):
        self.next, self.total, self.ok, self.deadline = 0, total, 0, deadline

    def take(self):
        if self.next >= self.total or time.monotonic() > self.deadline:
            return None
        self.next += 1
        return self.next - 1


async def session(port: int, rcpt: str, counter: Counter, reuse: bool, nonce: str) -> None:
    """One client: a connection per message, or one for all with ``reuse``."""
    conn = None
    while (n := counter.take()) is not None:
        data = attachment_message(rcpt, n, nonce)
        try:
            if conn is None:
                conn = await asyncio.open_connection("127.0.0.1", port)
                await reply(conn[0])
                await command(*conn, b"EHLO load.test\r\n")
            reader, writer = conn
            await command(reader, writer, b"MAIL FROM:<sender@source.test>\r\n")
            await command(reader, writer, f"RCPT TO:<{rcpt}>\r\n".encode())
            await command(reader, writer, b"DATA\r\n")
            writer.write(data)
            if await command(reader, writer, b".\r\n") == 250:
                counter.ok += 1
            if not reuse:
                await command(reader, writer, b"QUIT\r\n")
                writer.close()
                conn = None
        except (OSError, ConnectionError, ValueError):
            if conn is not None:
                conn[1].close()
            conn = None
    if conn is not None:
        conn[1].close()


async def run(port: int, rcpt: str, messages: int, sessions: int, reuse: bool, cap: float) -> tuple[int, int]:
    counter = Counter(messages, time.monotonic() + cap)
    nonce = os.urandom(6).hex()
    await asyncio.gather(*(session(port, rcpt, counter, reuse, nonce) for _ in range(sessions)))
    return counter.next, counter.ok


def source_cmd(mode: str, port: int, rcpt: str, messages: int, sessions: int = 8) -> tuple[list[str], dict]:
    """The command (and environment) of one load run: smtp-source for the
    2 KB modes, this script for ``attach``."""
    if mode == "attach":
        return ([str(common.PYTHON), str(Path(__file__).resolve()), "--port", str(port), "--rcpt", rcpt,
                 "--messages", str(messages), "--sessions", str(sessions)], dict(os.environ))
    binary, env = common.postfix_tool("smtp-source")
    cmd = [binary, "-s", str(sessions), "-m", str(messages), "-f", "sender@source.test", "-t", rcpt,
           "-l", "2048"] + (["-d"] if mode == "reuse" else [])
    return cmd + [f"127.0.0.1:{port}"], env


class Load:
    """A load running in the background (for profiles), stopped by ``stop``."""

    def __init__(self, mode: str, port: int, rcpt: str, _dir: Path, messages: int = 10**6):
        self.cmd, self.env = source_cmd(mode, port, rcpt, messages)
        self.proc = None

    def start(self, seconds: float) -> None:
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, start_new_session=True)

    def stop(self) -> str:
        self.proc.kill()
        out = self.proc.communicate()[0] or b""
        return out.decode(errors="replace").strip() or "?"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="100 KB SMTP load, a different message each time.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--rcpt", required=True)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--reuse", action="store_true", help="keep each session's connection")
    parser.add_argument("--cap", type=float, default=3600)
    args = parser.parse_args(argv)
    start = time.monotonic()
    sent, ok = asyncio.run(run(args.port, args.rcpt, args.messages, args.sessions, args.reuse, args.cap))
    print(f"sent={sent} ok={ok} seconds={time.monotonic() - start:.3f}", flush=True)


if __name__ == "__main__":
    main()
