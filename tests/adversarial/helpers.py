"""Real parts for the adversarial suite: the mail daemon and gunicorn as
subprocesses this suite starts (and only ever kills by their own pid or
process group), SMTP clients, and the summary every test adds its figures to.
"""
from __future__ import annotations

import contextlib
import json
import os
import smtplib
import socket
import subprocess
import time
from collections import defaultdict
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path

from conftest import free_port, kill_process, stop_process, wait_for_port  # tests/conftest.py (this package has its own name)
import smtpserver

ROOT = Path(__file__).resolve().parents[2]
VENV_BIN = ROOT / ".venv" / "bin"
SUMMARY: dict[str, list[str]] = defaultdict(list)


def record(section: str, line: str) -> None:
    """Add a line to the end-of-run summary (and print it for ``-s`` runs)."""
    SUMMARY[section].append(line)
    print(f"[{section}] {line}")


def write_config(app, path: Path, **overrides) -> Path:
    """The app's TempMail configuration (with its secret) as a JSON file for a
    subprocess, plus ``overrides``."""
    conf = dict(app.config["TEMPMAIL"])
    conf["secret_key"] = app.config["SECRET_KEY"]
    conf.update(overrides)
    path.write_text(json.dumps(conf))
    return path


def rss_kib(pid: int) -> dict:
    """Resident and peak resident memory of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0])
    return values


class Daemon:
    """``flask smtpd`` in a subprocess on a fixed port, restartable after a kill."""

    def __init__(self, config: Path, log: Path, port: int | None = None):
        self.config, self.log = config, log
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> "Daemon":
        env = dict(os.environ, TEMPMAIL_CONFIG=str(self.config))
        env.pop("DATABASE_URL", None)
        # One receiver unless the test's config asks for more: these tests
        # kill and restart "the daemon"; tests/test_daemon_processes.py
        # covers the supervisor with its receivers (the default on a fixed port).
        conf = json.loads(self.config.read_text())
        count = (conf.get("smtp") or {}).get("processes") or 1
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "flask"), "--app", "app", "smtpd", "--host", "127.0.0.1",
                 "--port", str(self.port), "--processes", str(count)], cwd=ROOT, env=env, stdout=out,
                stderr=subprocess.STDOUT)
        self.starts += 1
        wait_for_port(self.port, timeout=60)
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up, no last commit, no reply."""
        kill_process(self.proc)

    def stop(self) -> None:
        stop_process(self.proc)

    def memory(self) -> dict:
        return rss_kib(self.proc.pid)


class Gunicorn:
    """gunicorn serving ``wsgi:application`` in its own process group, so a
    SIGKILL of the group takes the master and every worker at once."""

    def __init__(self, config: Path, log: Path, workers: int = 4, extra: list[str] = ()):
        """``extra``: more gunicorn options (e.g. ``--config deploy/gunicorn.conf.py``;
        the options given here win over a config file's)."""
        self.config, self.log, self.workers, self.extra = config, log, workers, list(extra)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Gunicorn":
        env = dict(os.environ, TEMPMAIL_CONFIG=str(self.config))
        env.pop("DATABASE_URL", None)
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "gunicorn"), "--bind", f"127.0.0.1:{self.port}", "--workers",
                 str(self.workers), "--timeout", "120", *self.extra, "wsgi:application"], cwd=ROOT, env=env,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for_port(self.port, timeout=60)
        return self

    def kill(self) -> None:
        kill_process(self.proc, group=True)

    def stop(self) -> None:
        stop_process(self.proc, group=True)


def build_message(n: int, to: str, attachments: list[tuple[str, bytes]] = (), tag: str = "adv") -> bytes:
    """A unique message (own Message-ID and subject) in SMTP form (CRLF), so
    the bytes the daemon stores are exactly the bytes sent."""
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["From"] = f"Sender {n} <sender{n}@peer.test>"
    msg["To"] = to
    msg["Subject"] = f"{tag} message {n}"
    msg["Message-ID"] = f"<{tag}-{n}@peer.test>"
    msg.set_content(f"body of message {n}\n")
    for name, data in attachments:
        msg.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    return msg.as_bytes()


def smtp_session(port: int, timeout: float = 30) -> smtplib.SMTP:
    conn = smtplib.SMTP("127.0.0.1", port, timeout=timeout)
    conn.ehlo("client.test")
    return conn


@contextlib.contextmanager
def in_process_session(app, timeout: float = 20):
    """An EHLO'd SMTP session with an in-process daemon of ``app`` (stopped after)."""
    server = smtpserver.MailServer(app, "127.0.0.1", 0, purge=False).start()
    try:
        with smtp_session(server.port, timeout) as conn:
            yield conn
    finally:
        server.stop()


def send_one(port: int, rcpt: str, data: bytes, mail_from: str = "probe@peer.test",
             timeout: float = 30) -> tuple[int, float]:
    """One message on a fresh connection: (DATA reply code, seconds from
    connect to the reply)."""
    started = time.perf_counter()
    with smtp_session(port, timeout) as conn:
        conn.mail(mail_from)
        code, _ = conn.rcpt(rcpt)
        if code != 250:
            return code, time.perf_counter() - started
        code, _ = conn.data(data)
        return code, time.perf_counter() - started


def raw_session(port: int, payload: bytes, read_timeout: float = 2.0) -> bytes:
    """Send ``payload`` on a new connection, read what comes back until the
    server closes or stays silent, then drop the connection without QUIT."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(read_timeout)
        got = b""
        try:
            got += sock.recv(4096)
            sock.sendall(payload)
            while len(got) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
        except (socket.timeout, ConnectionResetError, BrokenPipeError):
            pass
        return got
