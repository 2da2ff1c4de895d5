"""`make run` as a user runs it: the real Makefile, deploy/run.sh, gunicorn and
the mail daemon, on spare ports and a throw-away SQLite database.

It is stopped the two ways it gets stopped: Ctrl-C (a terminal sends SIGINT
to the whole foreground process group) and SIGTERM to make alone (a process
manager; make forwards TERM to its recipe). Either way it must end without a
crash and leave no process of its group behind. One run also sends a mail
and reads /metrics: the daemon's count must show up in the web app's
exposition (PROMETHEUS_MULTIPROC_DIR shared by both).
"""
from __future__ import annotations

import json
import os
import re
import signal
import smtplib
import subprocess
import time
import urllib.error
import urllib.request
from email.message import EmailMessage
from pathlib import Path

import pytest

from conftest import ROOT, TEST_DOMAINS, free_port, wait_for_port

METRICS_TOKEN = "make-run-test-token"


class MakeRun:
    """``make run`` in its own process group (as a terminal's foreground job)."""

    def __init__(self, tmp_path: Path):
        self.web_port, self.smtp_port = free_port(), free_port()
        self.config = tmp_path / "config.json"
        conf = json.loads((ROOT / "config.example.json").read_text())
        conf.update({"database_url": f"sqlite:///{tmp_path}/tempmail.db",
                     "uploads_dir": str(tmp_path / "uploads"), "domains": TEST_DOMAINS,
                     "secret_key": "make-run-test-secret",
                     "smtp": {"host": "127.0.0.1", "port": self.smtp_port},
                     "metrics": {"enabled": True, "token": METRICS_TOKEN}})
        self.config.write_text(json.dumps(conf))
        self.metrics_dir = tmp_path / "metrics"
        self.metrics_dir.mkdir()
        # A stale file from an earlier run: make run must empty the folder.
        (self.metrics_dir / "counter_999999.db").write_bytes(b"stale")
        self.log = tmp_path / "make-run.log"
        env = dict(os.environ, TEMPMAIL_CONFIG=str(self.config))
        # Not the settings of an outer make (`make test` runs this suite).
        for name in ("PROMETHEUS_MULTIPROC_DIR", "MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
            env.pop(name, None)
        # -o .venv/.installed: the tests already run inside the installed
        # virtualenv; a pip run is not what is tested here.
        cmd = ["make", "--no-print-directory", "-o", ".venv/.installed", "run",
               "HOST=127.0.0.1", f"PORT={self.web_port}", f"METRICS_DIR={self.metrics_dir}"]
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until_up(self) -> None:
        """Both servers answer: the web app over HTTP, the daemon with its SMTP banner."""
        try:
            wait_for_port(self.web_port, timeout=90)
            wait_for_port(self.smtp_port, timeout=90)
            assert self.get("/healthz")[0] == 200
            with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as smtp:
                assert smtp.noop()[0] == 250
        except BaseException:
            self.kill()
            raise AssertionError(f"make run did not come up:\n{self.output()}")

    def get(self, path: str, headers: dict | None = None) -> tuple[int, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.web_port}{path}", headers=headers or {})
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()

    def stop(self, sig: int, whole_group: bool) -> int:
        """Send ``sig`` (to the group, as Ctrl-C does, or to make alone); make's exit status."""
        if whole_group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"make run did not stop on signal {sig}:\n{self.output()}")

    def survivors(self) -> list[str]:
        """Live (non-zombie) processes still in make's process group."""
        left = []
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text()
            except (OSError, ValueError):
                continue
            state, _ppid, pgrp = stat.rsplit(")", 1)[1].split()[:3]
            if int(pgrp) == self.proc.pid and state != "Z":
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                left.append(f"{entry.name}: {cmdline.decode(errors='replace')}")
        return left

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)


@pytest.fixture
def make_run(tmp_path):
    runs = []

    def start() -> MakeRun:
        run = MakeRun(tmp_path)
        runs.append(run)
        run.wait_until_up()
        return run

    yield start
    for run in runs:
        if run.proc.poll() is None or run.survivors():
            run.kill()


def assert_stopped_cleanly(run: MakeRun, status: int, sig: int) -> None:
    # make re-raises the signal on itself once its recipe has ended: a shell
    # shows that as 128 + signal number (130 for Ctrl-C).
    assert status in (-sig, 128 + sig, 0), f"exit status {status}\n{run.output()}"
    time.sleep(0.5)  # let the kernel finish tearing the group down
    assert run.survivors() == []
    output = run.output()
    for crash in ("Segmentation fault", "RecursionError", "Traceback", "stopped by itself"):
        assert crash not in output, output


def accepted_count(metrics_text: str) -> float:
    match = re.search(r'^tempmail_messages_total\{outcome="accepted",reason=""\} (\S+)$',
                      metrics_text, re.M)
    return float(match.group(1)) if match else 0.0


def test_ctrl_c_stops_both_and_metrics_count_the_daemons_mail(make_run):
    run = make_run()
    assert not (run.metrics_dir / "counter_999999.db").exists()  # emptied at start

    status, body = run.get("/api.php/generate?username=makerun&domain=example.com")
    assert status == 200, body
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "sender@example.org", "makerun@example.com", "hello"
    msg.set_content("counted by the daemon, scraped from the web app")
    with smtplib.SMTP("127.0.0.1", run.smtp_port, timeout=30) as smtp:
        smtp.send_message(msg)

    with pytest.raises(urllib.error.HTTPError) as refused:
        run.get("/metrics")
    assert refused.value.code == 401  # the configured token is required
    status, text = run.get("/metrics", {"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert status == 200
    # The mail daemon is another process than the gunicorn worker that answered.
    assert accepted_count(text) == 1.0, text

    assert_stopped_cleanly(run, run.stop(signal.SIGINT, whole_group=True), signal.SIGINT)


def test_sigterm_to_make_alone_stops_both(make_run):
    run = make_run()
    assert_stopped_cleanly(run, run.stop(signal.SIGTERM, whole_group=False), signal.SIGTERM)
