"""``flask smtpd --processes N``: the parent supervises its receivers, restarts
one that dies (with a back-off, logging why), and stops them all on SIGTERM."""
from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import time
from pathlib import Path

from conftest import ROOT, free_port, wait_for_port
import smtpserver
from models import Domain, Mailbox


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


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


def test_crashed_receiver_is_restarted(app, config_file, tmp_path):
    with app.app_context():
        Mailbox.create("keeper", Domain.by_name("example.com"), 3600)
    port, log = free_port(), tmp_path / "smtpd.log"
    env = dict(os.environ, TEMPMAIL_CONFIG=str(config_file))
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(ROOT / ".venv/bin/flask"), "--app", "app", "smtpd", "--port", str(port),
                                 "--processes", "2"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=60)
        first = wait_for(lambda: children(proc.pid) if len(children(proc.pid)) == 2 else None)
        victim = sorted(first)[0]
        os.kill(victim, signal.SIGKILL)
        again = wait_for(lambda: children(proc.pid) if len(children(proc.pid)) == 2
                         and victim not in children(proc.pid) else None)
        assert len(again - first) == 1
        for n in range(20):  # both receivers answer (SO_REUSEPORT spreads the connections)
            send(port, n)
        text = log.read_text(errors="replace")
        assert f"(pid {victim}) killed by signal 9; restarting it in 1 s" in text
        assert text.count("accepted id=") == 20
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert all(not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
               for pid in again)


def test_receivers_end_with_a_killed_supervisor_and_default_to_one_per_core(app, config_file, tmp_path):
    """``smtp.processes`` null (the default): one receiver per core on a fixed
    port. SIGKILL the supervisor and its receivers end too (none is left
    taking mail on the port unsupervised)."""
    port, log = free_port(), tmp_path / "smtpd.log"
    env = dict(os.environ, TEMPMAIL_CONFIG=str(config_file))
    with open(log, "ab") as out:
        proc = subprocess.Popen([str(ROOT / ".venv/bin/flask"), "--app", "app", "smtpd", "--port", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    cores = os.cpu_count() or 1
    try:
        wait_for_port(port, timeout=60)
        kids = wait_for(lambda: children(proc.pid) if len(children(proc.pid)) == cores else None) if cores > 1 \
            else set()
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        gone = lambda pid: not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        wait_for(lambda: all(gone(pid) for pid in kids))
    finally:
        if proc.poll() is None:
            proc.kill()
    assert smtpserver.receiver_count(None, port) == cores and smtpserver.receiver_count(None, 0) == 1
    assert smtpserver.receiver_count(3, 0) == 3
