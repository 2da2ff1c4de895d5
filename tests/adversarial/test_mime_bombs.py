"""Bad MIME through the real daemon: 1,000 levels of nesting, 10,000 parts,
a 50 MB base64 line, header bombs, the CPython sample corpus and fuzzed
malformed messages. Each is stored or refused with a 5xx, the daemon never
crashes, and what a message leaves on disk is bounded by the size limit."""
from __future__ import annotations

import base64
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from sqlalchemy import select

from models import Message, db

from .helpers import Daemon, build_message, record, send_one, smtp_session, write_config
from .test_nothing_lost import make_mailboxes
from test_receiving_parse import malformed_messages  # tests/test_receiving_parse.py

LIMIT = 26_214_400
# Peak RSS over the idle daemon's, for any message up to max_message_bytes
# (SECURITY.md section 4); a 7 MB folded header once took 3.4 GiB (and 226 s).
BUDGET_MIB = 256
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
        assert send_one(daemon.port, rcpt, b"Subject: warm-up\r\n\r\nx\r\n")[0] == 250
        idle = daemon.memory()["VmRSS"]
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
           f"{memory['VmHWM'] // 1024} MiB, {(memory['VmHWM'] - idle) // 1024} MiB over idle (bound {BUDGET_MIB}); "
           f"tracebacks in its log: {log.count('Traceback')}")
    assert alive
    assert all(code == 250 or 500 <= code < 600 for code, _, _ in results.values())
    assert results["50 MB base64 line"][0] == 552 and disk_after == disk_before
    assert results["1,000 nested multiparts"][0] == 250 and results["10,000 parts"][0] == 250
    assert corpus_codes == {250}
    assert all(size <= LIMIT and total <= 2 * LIMIT for size, total in footprint)
    assert "connection from" not in log and "writer failed" not in log
    assert log.count("Traceback") == 0
    assert (memory["VmHWM"] - idle) // 1024 <= BUDGET_MIB


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


# --------------------------------------------------------------------------
# The budget of one message (SECURITY.md section 4): the outside review's
# file-name, parameter and HTML bombs, and big text bodies that cost 4 bytes
# a character once decoded, at 1 MB and at the size limit, each with a
# normal message sent while the daemon works on it.

BOMB_SIZES = {"1 MB": 1_000_000, "25 MB": LIMIT - 65_536}


def folded(units: list[bytes], per_line: int, sep: bytes) -> bytes:
    """``units`` joined by ``sep``, ``per_line`` of them on each folded line."""
    lines = [sep.join(units[i:i + per_line]) for i in range(0, len(units), per_line)]
    return (sep.rstrip() + b"\r\n ").join(lines) if sep.strip() else b"\r\n ".join(lines)


def sized(build, size: int) -> bytes:
    """``build(n)`` with about the largest ``n`` that keeps it within ``size``
    bytes (the builders grow by the same number of bytes for each 1,000)."""
    step = len(build(2000)) - len(build(1000))
    base = len(build(1000)) - step
    raw = build((size - base) * 1000 // step)
    assert size - 2 * step < len(raw) <= size
    return raw


def filename_bomb(words: int) -> bytes:
    """An attachment whose file name is ``words`` RFC 2047 encoded words (the
    outside review: 20,000 words, 340 KB, took the daemon to 3.4 GiB)."""
    words = [b"=?utf-8?b?w6k=?="] * words
    return (b"From: bomb@peer.test\r\nTo: x\r\nSubject: file name bomb\r\n"
            b"Content-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\n"
            b"see the file\r\n--B\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
            b'Content-Disposition: attachment; filename="' + folded(words, 4, b" ") + b'"\r\n\r\nAAEC\r\n--B--\r\n')


def parameter_bomb(count: int) -> bytes:
    """A top-level Content-Type with ``count`` parameters, the boundary last (the
    outside review: 60,000 parameters, 0.59 MB, held the writer 43.5 s)."""
    params = [b"p%07d=v" % i for i in range(count)]
    return (b"From: bomb@peer.test\r\nTo: x\r\nSubject: parameter bomb\r\nContent-Type: multipart/mixed; "
            + folded(params, 8, b"; ") + b'; boundary="B"\r\n\r\n--B\r\nContent-Type: text/plain\r\n\r\nbody\r\n--B--\r\n')


def html_bomb(units: int) -> bytes:
    """An HTML-only message of ``units`` pieces of flowing inline text, tags that
    never close (quadratic for html.parser) and nesting (quadratic for html5ever)
    (the outside review: 8 MB took 19.9 s and 1.22 GB in html_to_text)."""
    unit = (b'<div><p>Hello <b>John</b>, <a href="https://x.test/">click here</a> &amp; <span>more</span></p>'
            + b"<a " * 8 + b"<div>" * 8 + b"</div>\r\n")
    return (b"From: bomb@peer.test\r\nTo: x\r\nSubject: html bomb\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
            + unit * units)


def text_body(units: int, ctype: bytes, first: bytes, fill: bytes) -> bytes:
    return (b"Content-Type: " + ctype + b"\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + first
            + fill * (units - len(first)) + b"\r\n")


def junk_text_bomb(units: int) -> bytes:
    """``units`` random bytes as an unlabelled 8-bit text body: undecodable as
    UTF-8 (decoded twice), one line (the parser's worst), 2-4 bytes a
    character once decoded. Before the body cap: 349 MiB over idle at 26 MB."""
    junk = os.urandom(units).translate(bytes.maketrans(b"\r\n.", b"rnd"))
    return b"From: bomb@peer.test\r\nTo: x\r\nSubject: junk\r\n" + text_body(units, b"text/plain", junk, b"")


def emoji_text_bomb(units: int) -> bytes:
    """ASCII text with one emoji first, so that Python stores each of its
    characters in 4 bytes. Before the body cap: 381 MiB over idle at 26 MB."""
    return (b"From: bomb@peer.test\r\nTo: x\r\nSubject: emoji\r\n"
            + text_body(units, b"text/plain; charset=utf-8", "\U0001f600".encode(), b"a"))


def two_bodies_bomb(units: int) -> bytes:
    """multipart/alternative: half the size as junk text, half as HTML with an emoji."""
    half = units // 2
    return (b"From: bomb@peer.test\r\nTo: x\r\nSubject: two bodies\r\n"
            b"Content-Type: multipart/alternative; boundary=Z\r\n\r\n--Z\r\n"
            + junk_text_bomb(half).split(b"\r\n", 3)[3] + b"--Z\r\n"
            + text_body(units - half, b"text/html; charset=utf-8", "<p>\U0001f600".encode(), b"a") + b"--Z--\r\n")


def header_fields_bomb(count: int) -> bytes:
    """``count`` distinct header fields (past the parser's 400,000 lines at 26 MB)."""
    return b"".join(b"X-H%07d: v\r\n" % i for i in range(count)) + b"From: bomb@peer.test\r\nSubject: fields\r\n\r\nx\r\n"


def parts_bomb(count: int) -> bytes:
    """``count`` small named parts (past the parser's 2,000 at 1 MB; 10,000
    parts of 1.4 MB took 17 s before)."""
    part = (b"--p\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Disposition: attachment; filename=a.txt\r\n\r\nx\r\n")
    return (b"From: bomb@peer.test\r\nTo: x\r\nSubject: parts\r\nContent-Type: multipart/mixed; boundary=p\r\n\r\n"
            + part * count + b"--p--\r\n")


BOMBS = {"file name": filename_bomb, "parameters": parameter_bomb, "HTML": html_bomb,
         "junk text": junk_text_bomb, "emoji text": emoji_text_bomb, "text and HTML": two_bodies_bomb,
         "header fields": header_fields_bomb, "parts": parts_bomb}


def timed_send(port: int, rcpt: str, raw: bytes, sent=None, timeout: float = 300) -> dict:
    """One message on a new connection: its DATA reply code, seconds from the
    end of DATA to that reply (the writer's time, when nothing waits before
    it) and from the connection to the reply. ``sent`` (an Event) is set once
    the whole message is handed to the kernel."""
    data = re.sub(rb"(?m)^\.", b"..", raw if raw.endswith(b"\r\n") else raw + b"\r\n") + b".\r\n"
    started = time.perf_counter()
    with smtp_session(port, timeout) as conn:
        conn.mail("probe@peer.test")
        conn.rcpt(rcpt)
        conn.putcmd("data")
        assert conn.getreply()[0] == 354
        conn.send(data)
        end_of_data = time.perf_counter()
        if sent is not None:
            sent.set()
        code, _ = conn.getreply()
    done = time.perf_counter()
    return {"code": code, "writer": done - end_of_data, "total": done - started, "done": done}


def reset_peak(pid: int) -> None:
    """Set VmHWM back to the current RSS (``clear_refs`` 5, Linux >= 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def bomb_with_neighbour(daemon: Daemon, rcpt: str, raw: bytes) -> tuple[dict, dict]:
    """Send ``raw``; a moment after all of it is sent, send a normal message
    on another connection, while the daemon parses and stores the bomb."""
    sent = threading.Event()
    with ThreadPoolExecutor(2) as pool:
        bomb = pool.submit(timed_send, daemon.port, rcpt, raw, sent)
        sent.wait(timeout=300)
        time.sleep(0.1)  # let the daemon read the end of the bomb and start on it
        normal = pool.submit(timed_send, daemon.port, rcpt, build_message(0, rcpt, tag=f"beside-{len(raw)}"),
                             None, 120)
        return bomb.result(timeout=360), normal.result(timeout=360)


def test_bombs_stay_within_the_message_budget(app, tmp_path):
    """Each bomb at 1 MB and 26 MB is stored (or refused with a 5xx) for at
    most BUDGET_MIB over the idle daemon's memory, and a normal message sent
    meanwhile gets its 250. Writer seconds and latencies are printed."""
    (rcpt,) = make_mailboxes(app, 1, "budget")
    daemon = Daemon(write_config(app, tmp_path / "budget.json", max_message_bytes=LIMIT),
                    tmp_path / "smtpd.log").start()
    results = {}
    try:
        assert send_one(daemon.port, rcpt, build_message(1, rcpt, tag="warm-up"))[0] == 250
        idle = daemon.memory()["VmRSS"]
        for label, size in BOMB_SIZES.items():
            for kind, build in BOMBS.items():
                raw = sized(build, size)
                reset_peak(daemon.proc.pid)
                bomb, normal = bomb_with_neighbour(daemon, rcpt, raw)
                results[f"{kind} bomb, {label}"] = (len(raw), bomb, normal, daemon.memory()["VmHWM"] - idle)
        alive = daemon.proc.poll() is None
    finally:
        daemon.stop()
    log = (tmp_path / "smtpd.log").read_text(errors="replace")
    record("message budget", f"daemon idle RSS {idle // 1024} MiB; budget {BUDGET_MIB} MiB over idle, 5 s of writer time")
    for name, (size, bomb, normal, over) in results.items():
        record("message budget", f"{name} ({size / 1e6:.1f} MB): {bomb['code']}, writer {bomb['writer']:.2f} s, "
               f"peak RSS +{over // 1024} MiB over idle; normal mail sent beside it: {normal['code']} "
               f"{normal['total']:.2f} s after it was sent, "
               f"{'before' if normal['done'] < bomb['done'] else 'after'} the bomb's reply")
    assert alive and log.count("Traceback") == 0
    for name, (size, bomb, normal, over) in results.items():
        assert size <= LIMIT
        assert bomb["code"] == 250 or 500 <= bomb["code"] < 600, name
        assert normal["code"] == 250, name
        assert over // 1024 <= BUDGET_MIB, name

