"""``flask smtpd --processes N``: the parent supervises its receivers and the
writer process they hand mail to (writerlink.py), restarts one that dies
(with a back-off, logging why), and stops them all on SIGTERM."""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import signal
import smtplib
import subprocess
import time
from pathlib import Path

from conftest import ROOT, free_port, wait_for_port
import mailhandler
import smtpserver
import storage
from models import Domain, Mailbox, Message, db


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def writer_of(pids: set[int]) -> int | None:
    """The writer process among a supervisor's children (it names itself)."""
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == "smtpd-writer":
                return pid
        except OSError:
            continue
    return None


def receivers(pid: int) -> set[int]:
    kids = children(pid)
    return kids - {writer_of(kids)}


def start_daemon(config_file, port: int, log: Path, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, TEMPMAIL_CONFIG=str(config_file))
    with open(log, "ab") as out:
        return subprocess.Popen([str(ROOT / ".venv/bin/flask"), "--app", "app", "smtpd", "--port", str(port),
                                 *extra], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for(predicate, timeout: float = 30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def send(port: int, n: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as conn:
        conn.sendmail("s@example.org", ["keeper@example.com"], f"Subject: {n}\r\n\r\nx\r\n".encode())


def whole_family(proc: subprocess.Popen) -> set[int]:
    """The receivers once both run beside the writer (named once it has started)."""
    return wait_for(lambda: receivers(proc.pid) if len(children(proc.pid)) == 3
                    and writer_of(children(proc.pid)) else None)


@contextlib.contextmanager
def two_receivers(app, config_file, tmp_path):
    """``flask smtpd --processes 2`` with a mailbox ``keeper``; (process, log)."""
    with app.app_context():
        Mailbox.create("keeper", Domain.by_name("example.com"), 3600)
    port, log = free_port(), tmp_path / "smtpd.log"
    proc = start_daemon(config_file, port, log, "--processes", "2")
    try:
        wait_for_port(port, timeout=60)
        yield proc, port, log
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_crashed_receiver_is_restarted(app, config_file, tmp_path):
    with two_receivers(app, config_file, tmp_path) as (proc, port, log):
        first = whole_family(proc)
        assert len(first) == 2
        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: victim not in children(proc.pid))
        again = whole_family(proc)
        assert len(again - first) == 1
        for n in range(20):  # both receivers answer (SO_REUSEPORT spreads the connections)
            send(port, n)
        text = log.read_text(errors="replace")
        assert f"receiver process 0 (pid {victim}) killed by signal 9; restarting it in 1 s" in text
        assert text.count("accepted id=") == 20
    assert all(not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
               for pid in again)


def send_and_tell(port: int, n: int) -> int:
    """The final reply code of one message (0: no answer at all)."""
    try:
        send(port, n)
        return 250
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code
    except (OSError, smtplib.SMTPException):
        return 0


def test_a_killed_writer_is_restarted_and_no_250_is_lost(app, config_file, tmp_path):
    """SIGKILL the writer process with a message handed to it and not yet
    stored (the writer stopped first, so it cannot have read it): that
    message is answered 451, so its sender retries. The supervisor starts a
    new writer on the same socket; the receivers, still running, hand it
    their next mail, which waits in the socket's backlog meanwhile (250,
    stored, not refused); every 250 is stored."""
    with two_receivers(app, config_file, tmp_path) as (proc, port, log):
        kept = whole_family(proc)
        writer = writer_of(children(proc.pid))
        codes = {n: send_and_tell(port, n) for n in range(10)}
        os.kill(writer, signal.SIGSTOP)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            caught = pool.submit(send_and_tell, port, 10)
            time.sleep(1.0)  # handed over, waiting for its reply
            assert not caught.done()
            os.kill(writer, signal.SIGKILL)
            codes[10] = caught.result(timeout=30)
        codes.update({n: send_and_tell(port, n) for n in range(11, 30)})  # during and after the restart
        assert writer_of(children(proc.pid)) not in (None, writer)
        assert receivers(proc.pid) == kept  # the receivers lived through it
    with app.app_context():
        stored = {int(s) for s in db.session.scalars(db.select(Message.subject))}
    assert codes[10] == 451 and 10 not in stored
    assert all(code == 250 for n, code in codes.items() if n != 10), codes
    assert stored == set(range(30)) - {10}
    assert f"writer process (pid {writer}) killed by signal 9; restarting it in 1 s" in log.read_text()


def test_receivers_end_with_a_killed_supervisor_and_default_to_one_per_core(app, config_file, tmp_path):
    """``smtp.processes`` null (the default): one receiver per core on a fixed
    port. SIGKILL the supervisor and its receivers end too (none is left
    taking mail on the port unsupervised)."""
    port, log = free_port(), tmp_path / "smtpd.log"
    proc = start_daemon(config_file, port, log)
    cores = os.cpu_count() or 1
    try:
        wait_for_port(port, timeout=60)
        # one receiver per core, and the writer process beside them
        kids = wait_for(lambda: children(proc.pid) if len(children(proc.pid)) == cores + 1 else None) \
            if cores > 1 else set()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        gone = lambda pid: not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        wait_for(lambda: all(gone(pid) for pid in kids))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert smtpserver.receiver_count(None, port) == cores and smtpserver.receiver_count(None, 0) == 1
    assert smtpserver.receiver_count(3, 0) == 3


def test_smtputf8_envelopes_reach_the_writer_whole(app, config_file, tmp_path):
    """An SMTPUTF8 envelope (RFC 6531) crosses the receiver-writer link as it
    was given: the stored envelope sender is the very address."""
    with two_receivers(app, config_file, tmp_path) as (proc, port, _log):
        whole_family(proc)
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as conn:
            conn.sendmail("\u00e9t\u00e9@b\u00fccher.example", ["keeper@example.com"],
                          "Subject: utf8\r\n\r\nx\r\n".encode(), mail_options=["SMTPUTF8"])
    with app.app_context():
        assert db.session.scalars(db.select(Message.envelope_from)).all() == ["\u00e9t\u00e9@b\u00fccher.example"]


COLUMNS = ("from_email", "from_name", "to", "cc", "subject", "date", "message_id", "body_text", "body_html")


def test_a_message_parsed_by_its_receiver_is_stored_as_the_writer_would_parse_it(app, config_file, tmp_path):
    """With a writer process, a receiver may parse the mail it takes and
    hand the result over with it (``Job.fields``; ``smtp.receiver_parse``
    "always" here, "auto" does it while the writer is behind): every sample
    message (plain, HTML only, quoted-printable, base64, attachments, 8-bit
    and encoded headers) is stored with the columns and attachments that
    ``parse_message`` gives in the writer's own process."""
    samples = {path.name: path.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
               for path in sorted((Path(__file__).parent / "data" / "extract").glob("*.eml"))}
    config = json.loads(config_file.read_text())
    config["smtp"]["receiver_parse"] = "always"
    config_file.write_text(json.dumps(config))
    with two_receivers(app, config_file, tmp_path) as (proc, port, _log):
        whole_family(proc)
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as conn:
            for name, raw in samples.items():
                conn.sendmail("s@example.org", [f"keeper+{name[:2]}@example.com"], raw)
    with app.app_context():
        stored = {msg.tag: msg for msg in db.session.scalars(db.select(Message))}
        assert len(stored) == len(samples)
        for name, raw in samples.items():
            want, msg = mailhandler.parse_message(raw), stored[name[:2]]
            # named by the digest the receiver made, which is its stored bytes'
            assert msg.raw_sha256 == storage.digest(storage.read(msg.raw_sha256)), name
            assert {c: getattr(msg, c) for c in COLUMNS} == {c: want[c] for c in COLUMNS}, name
            assert [(a.filename, a.content_type, a.size, a.content_id, a.inline) for a in msg.attachments] == \
                [(a["filename"], a["content_type"], len(a["data"]), a["content_id"], a["inline"])
                 for a in want["attachments"]], name
