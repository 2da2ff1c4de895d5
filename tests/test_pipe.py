"""Pipe mode as an MTA runs it: ``python mailhandler.py pipe`` in a subprocess,
one message on stdin, sysexits codes out."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT, free_port
from models import Domain, Mailbox


def run_pipe(config_file, raw: bytes, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("RECIPIENT", "ORIGINAL_RECIPIENT")}
    environ.update(TEMPMAIL_CONFIG=str(config_file), **env)
    return subprocess.run([sys.executable, str(ROOT / "mailhandler.py"), "pipe", *args], input=raw,
                          cwd="/", env=environ, capture_output=True, timeout=60)


def test_pipe_subprocess_exit_codes(app, client, config_file):
    with app.app_context():
        Mailbox.create("pip", Domain.by_name("example.com"), 3600)
    ok = run_pipe(config_file, b"Subject: by option\r\n\r\nhello\r\n", "--to", "pip@example.com")
    assert ok.returncode == 0, ok.stderr
    unknown = run_pipe(config_file, b"Subject: x\r\n\r\nx\r\n", RECIPIENT="ghost@example.com")
    assert unknown.returncode == 67 and b"5.1.1" in unknown.stderr
    subjects = [m["subject"] for m in client.get("/api.php/inbox/pip@example.com").get_json()["emails"]]
    assert subjects == ["by option"]


def test_flask_pipe_recipient_sources_and_codes(app, client, runner, monkeypatch):
    monkeypatch.delenv("RECIPIENT", raising=False)
    monkeypatch.delenv("ORIGINAL_RECIPIENT", raising=False)
    with app.app_context():
        Mailbox.create("pip", Domain.by_name("example.com"), 3600)
        Mailbox.create("bcc", Domain.by_name("example.com"), 3600)
    monkeypatch.setenv("ORIGINAL_RECIPIENT", "PIP@example.com")
    assert runner.invoke(args=["pipe"], input=b"Subject: by env\r\n\r\nx\r\n").exit_code == 0
    monkeypatch.delenv("ORIGINAL_RECIPIENT")
    # No envelope: Delivered-To names the Bcc'd recipient, To names someone unknown.
    by_header = b"Delivered-To: bcc@example.com\r\nTo: who@example.com\r\nSubject: by header\r\n\r\nx\r\n"
    assert runner.invoke(args=["pipe"], input=by_header).exit_code == 0
    relay = runner.invoke(args=["pipe", "--to", "pip@elsewhere.org"], input=b"Subject: x\r\n\r\nx\r\n")
    assert relay.exit_code == 67
    assert runner.invoke(args=["pipe", "--to", "pip@example.com"], input=b"").exit_code == 65
    assert runner.invoke(args=["pipe"], input=b"Subject: nobody named\r\n\r\nx\r\n").exit_code == 65
    app.config["TEMPMAIL"]["max_message_bytes"] = 100
    too_big = runner.invoke(args=["pipe", "--to", "pip@example.com"], input=b"Subject: x\r\n\r\n" + b"x" * 200)
    assert too_big.exit_code == 65
    app.config["TEMPMAIL"]["max_message_bytes"] = 26214400
    app.config["FAIL_NEXT_STORE"] = 1
    assert runner.invoke(args=["pipe", "--to", "pip@example.com"], input=b"Subject: x\r\n\r\nx").exit_code == 75
    for address, subjects in (("pip", ["by env"]), ("bcc", ["by header"])):
        emails = client.get(f"/api.php/inbox/{address}@example.com").get_json()["emails"]
        assert [m["subject"] for m in emails] == subjects


def test_pipe_tempfails_when_the_database_is_down(tmp_path):
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/tempmail"
    config = tmp_path / "config.json"
    config.write_text('{"domains": [{"domain": "example.com", "type": "free"}]}')
    result = run_pipe(config, b"Subject: x\r\n\r\nx\r\n", "--to", "a@example.com", DATABASE_URL=dead)
    assert result.returncode == 75, result.stderr
