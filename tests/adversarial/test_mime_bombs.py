"""Bad MIME through the real daemon: 1,000 levels of nesting, 10,000 parts,
a 50 MB base64 line, header bombs, the CPython sample corpus and fuzzed
malformed messages. Each is stored or refused with a 5xx, the daemon never
crashes, and what a message leaves on disk is bounded by the size limit."""
from __future__ import annotations

import base64
import os
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from sqlalchemy import select

from models import Message, db

from .helpers import Daemon, record, send_one, write_config
from .test_nothing_lost import make_mailboxes
from test_receiving_parse import malformed_messages  # tests/test_receiving_parse.py

LIMIT = 26_214_400
PEAK_RSS_BOUND_MIB = 1024  # a 7 MB folded header once took 3.4 GiB (and 226 s)
CPYTHON = Path(__file__).resolve().parents[1] / "data" / "cpython"


def head(subject: str, ctype: str = "text/plain") -> bytes:
    return f"From: bomb@peer.test\r\nTo: x\r\nSubject: {subject}\r\nContent-Type: {ctype}\r\n".encode()


def deep_multipart(levels: int) -> bytes:
    opening = b"".join(f"--b{i}\r\nContent-Type: multipart/mixed; boundary=b{i + 1}\r\n\r\n".encode()
                       for i in range(levels))
    closing = b"".join(f"--b{i}--\r\n".encode() for i in reversed(range(levels)))
    return (head("deep multipart", "multipart/mixed; boundary=b0") + b"\r\n" + opening
            + f"--b{levels}\r\nContent-Type: text/plain\r\n\r\nbottom\r\n".encode() + closing)


def deep_rfc822(levels: int) -> bytes:
    return head("deep rfc822", "message/rfc822") * 1 + b"\r\n" + (
        b"Content-Type: message/rfc822\r\n\r\n" * levels) + b"Subject: bottom\r\n\r\nbottom\r\n"


def many_parts(count: int) -> bytes:
    parts = b"".join(f"--p\r\nContent-Type: application/octet-stream\r\nContent-Disposition: attachment; "
                     f"filename=f{i}.bin\r\nContent-Transfer-Encoding: base64\r\n\r\nAAEC\r\n".encode()
                     for i in range(count))
    return head("10,000 parts", "multipart/mixed; boundary=p") + b"\r\n" + parts + b"--p--\r\n"


def base64_line(size: int) -> bytes:
    """One unbroken base64 line of ``size`` bytes in an attachment part."""
    line = base64.b64encode(os.urandom(size * 3 // 4))
    return (head("one long base64 line", "multipart/mixed; boundary=L") + b"\r\n--L\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=big.bin\r\n\r\n" + line + b"\r\n--L--\r\n")


def header_bombs() -> dict:
    return {
        "100,000 header fields": b"".join(b"X-H%d: v\r\n" % i for i in range(100_000)) + head("many") + b"\r\nx\r\n",
        "5 MB folded Subject": b"From: a@b\r\nSubject: " + b"word\r\n " * 1_000_000 + b"end\r\n\r\nx\r\n",
        "100,000 To addresses": b"From: a@b\r\nTo: " + b", ".join(b"u%d@x.test" % i for i in range(100_000))
        + b"\r\nSubject: many rcpts\r\n\r\nx\r\n",
        "20,000 encoded words": b"From: a@b\r\nSubject: " + b" ".join([b"=?utf-8?b?w6k=?="] * 20_000)
        + b"\r\n\r\nx\r\n",
        "1 MB parameter": head("param", 'text/plain; name="' + "n" * 1_000_000 + '"') + b"\r\nx\r\n",
        "unbalanced comments": b"From: ((((((((((((((((((((" * 20_000 + b"\r\nSubject: c\r\n\r\nx\r\n",
    }


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def stored_footprint(app) -> list[tuple[int, int]]:
    """(message size, bytes of its raw file plus attachment files) per message."""
    with app.app_context():
        return [(m.size, m.size + sum(a.size for a in m.attachments))
                for m in db.session.scalars(select(Message))]


def test_mime_bombs_are_stored_or_refused(app, tmp_path):
    (rcpt,) = make_mailboxes(app, 1, "bombs")
    daemon = Daemon(write_config(app, tmp_path / "bombs.json", max_message_bytes=LIMIT),
                    tmp_path / "smtpd.log").start()
    cases = {"1,000 nested multiparts": deep_multipart(1000), "1,000 nested message/rfc822": deep_rfc822(1000),
             "10,000 parts": many_parts(10_000), "20 MB base64 line": base64_line(20_000_000),
             **header_bombs()}
    results = {}
    try:
        for name, raw in cases.items():
            started = time.perf_counter()
            code, _ = send_one(daemon.port, rcpt, raw, timeout=300)
            results[name] = (code, len(raw), time.perf_counter() - started)
        uploads = Path(app.config["UPLOADS_DIR"])
        disk_before = disk_bytes(uploads)
        code, _ = send_one(daemon.port, rcpt, base64_line(50_000_000), timeout=300)
        results["50 MB base64 line"] = (code, 50_000_000, 0.0)
        disk_after = disk_bytes(uploads)
        corpus = sorted(CPYTHON.glob("msg_*.txt"))
        corpus_codes = {send_one(daemon.port, rcpt, path.read_bytes().replace(b"\n", b"\r\n"))[0]
                        for path in corpus}
        alive = daemon.proc.poll() is None
        memory = daemon.memory()
    finally:
        daemon.stop()
    log = (tmp_path / "smtpd.log").read_text(errors="replace")
    footprint = stored_footprint(app)
    for name, (code, size, seconds) in results.items():
        record("bad MIME", f"{name} ({size / 1e6:.1f} MB): {code} in {seconds:.2f} s")
    record("bad MIME", f"{len(corpus)} CPython sample messages: replies {sorted(corpus_codes)}; "
           f"uploads grew by {disk_after - disk_before} bytes for the refused 50 MB message")
    record("bad MIME", f"largest footprint on disk {max(f for _, f in footprint) / 1e6:.1f} MB "
           f"(raw + decoded parts, bound 2 x {LIMIT / 1e6:.1f} MB); daemon peak RSS "
           f"{memory['VmHWM'] // 1024} MiB (bound {PEAK_RSS_BOUND_MIB}); tracebacks in its log: {log.count('Traceback')}")
    assert alive
    assert all(code == 250 or 500 <= code < 600 for code, _, _ in results.values())
    assert results["50 MB base64 line"][0] == 552 and disk_after == disk_before
    assert results["1,000 nested multiparts"][0] == 250 and results["10,000 parts"][0] == 250
    assert corpus_codes == {250}
    assert all(size <= LIMIT and total <= 2 * LIMIT for size, total in footprint)
    assert "connection from" not in log and "writer failed" not in log
    assert log.count("Traceback") == 0
    assert memory["VmHWM"] // 1024 < PEAK_RSS_BOUND_MIB


def test_fuzzed_malformed_messages_over_smtp(app, tmp_path):
    """The receiving issue's malformed-message strategy, sent through the daemon."""
    (rcpt,) = make_mailboxes(app, 1, "malformed")
    daemon = Daemon(write_config(app, tmp_path / "fuzz.json"), tmp_path / "smtpd.log").start()
    codes: list[int] = []
    distinct: set[bytes] = set()  # identical examples are one message (the retry rule)

    @settings(max_examples=200, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(raw=malformed_messages())
    def send(raw):
        raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        if not raw.endswith(b"\r\n"):
            raw += b"\r\n"  # as smtplib's data() ends it: the bytes the daemon stores
        code, _ = send_one(daemon.port, rcpt, raw)
        codes.append(code)
        distinct.add(raw)
        assert code == 250

    try:
        send()
        alive = daemon.proc.poll() is None
    finally:
        daemon.stop()
    with app.app_context():
        stored = len(list(db.session.scalars(select(Message.id))))
    record("bad MIME", f"{len(codes)} fuzzed malformed messages over SMTP ({len(distinct)} distinct): "
           f"{stored} stored, replies {sorted(set(codes))}")
    assert alive and stored == len(distinct)
