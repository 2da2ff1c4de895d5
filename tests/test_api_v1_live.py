"""The User API served by a real gunicorn, used the way a client would: seed
000's own Python ``requests`` snippets, and 400 concurrent requests across four
worker processes to prove the quota count exact."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from conftest import free_port, wait_for_port
from models import ApiKey, Mailbox, QuotaUsage, User, db
from seeds import SEEDS, examples
from shapes import assert_same_shape
import mailhandler  # noqa: E402
import limits  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SEED_BASE = "https://v1.tempmailg.com"
SEED_MESSAGE_ID = "ap94AWDg123ELQz07vrVB9dLXlbqZM5NGwYxOJKko8n6m1"


@contextmanager
def gunicorn(config_file, workers: int, log_path):
    """A gunicorn serving wsgi:application on a spare port; yields its base URL."""
    port = free_port()
    env = {**os.environ, "TEMPMAIL_CONFIG": str(config_file)}
    env.pop("DATABASE_URL", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{port}", "--workers",
             str(workers), "--timeout", "60", "wsgi:application"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def make_key(app, email="client@example.org", plan="free") -> str:
    with app.app_context():
        _key, raw = ApiKey.issue(User.create(email, plan=plan))
        db.session.commit()
        return raw


def python_snippets() -> list[str]:
    """Seed 000's Python samples in order (each runs from ``import requests`` to
    the PHP sample after it), re-indented: the seed lost the indentation, and
    every line after one ending in ``:`` belongs one level deeper."""
    lines = next(SEEDS.glob("000*.txt")).read_text(encoding="utf-8").splitlines()
    snippets, current = [], None
    for line in lines:
        if line == "import requests":
            current = []
        elif current is not None and line.startswith("<?php"):
            snippets.append("\n".join(current))
            current = None
            continue
        if current is not None:
            previous = current[-1] if current else ""
            indent = len(previous) - len(previous.lstrip())
            current.append(" " * (indent + 4 * previous.endswith(":")) + line)
    return snippets


def run_snippet(code: str, cwd, **subs):
    for old, new in subs.items():
        code = code.replace(old, new)
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, f"{code}\n{done.stderr}"
    return ast.literal_eval(done.stdout.strip()) if done.stdout.strip() else None


def test_seed_has_eight_python_samples():
    snippets = python_snippets()
    assert len(snippets) == 8
    assert "handle.write(chunk)" in snippets[-1]
    compile(snippets[-1], "download", "exec")


def test_seed_python_samples_against_live_server(app, config_file, tmp_path):
    key = make_key(app)
    (domains, created, switched, box_deleted, listed, read, msg_deleted) = examples("000")
    (s_domains, s_create, s_switch, s_delete_box, s_list, s_read, s_delete_msg,
     s_download) = python_snippets()
    with gunicorn(config_file, 2, tmp_path / "gunicorn.log") as base:
        subs = {SEED_BASE: base, "YOUR_USER_API_KEY": key}
        assert_same_shape(run_snippet(s_domains, tmp_path, **subs), domains)
        box = run_snippet(s_create, tmp_path, **subs)
        assert_same_shape(box, created)
        public_id = deliver(app, box["data"]["email"], b"x" * 91)
        subs.update({"current@example.com": box["data"]["email"], SEED_MESSAGE_ID: public_id})
        assert_same_shape(run_snippet(s_switch, tmp_path, **subs), switched)
        assert_same_shape(run_snippet(s_list, tmp_path, **subs), listed)
        assert_same_shape(run_snippet(s_read, tmp_path, **subs), read)
        assert run_snippet(s_download, tmp_path, **subs) is None
        assert (tmp_path / "file.txt").read_bytes() == b"x" * 91
        assert run_snippet(s_delete_msg, tmp_path, **subs) == msg_deleted
        assert run_snippet(s_delete_box, tmp_path, **subs) == box_deleted
    with app.app_context():
        assert Mailbox.find_live("demo123@example.com") is None


def deliver(app, address: str, data: bytes) -> str:
    with app.app_context():
        msg = mailhandler.store_message(Mailbox.find_live(address), {
            "from_email": "hello@example.org", "from_name": "Example Sender",
            "subject": "Welcome to Temp Mail", "body_html": "<p>Hello from the inbox.</p>",
            "body_text": "Hello from the inbox."}, b"Subject: x\r\n\r\nx\r\n",
            [{"filename": "file.txt", "data": data, "content_type": "text/plain"}])
        db.session.commit()
        return msg.public_id


def test_quota_exact_under_four_workers(app, config_file, tmp_path):
    """400 concurrent requests, half of them failing: Used equals the 2xx count.
    Each request reserves its unit before it runs and a failure gives it back,
    so the count a 2xx reports includes requests still in flight (at most
    one per concurrent request above the 2xx seen so far)."""
    key = make_key(app)
    headers = {"Authorization": f"Bearer {key}", "Accept": "application/json"}
    calls = [("GET", "/api/domains"), ("GET", "/api/domains?type=premium"),  # 200, 403
             ("POST", "/api/emails"), ("GET", "/api/messages?email=nobody@example.com")]  # 200, 404
    with gunicorn(config_file, 4, tmp_path / "gunicorn.log") as base:
        def call(i: int):
            method, path = calls[i % len(calls)]
            resp = requests.request(method, base + path, headers=headers, timeout=60)
            return resp.status_code, int(resp.headers["X-RateLimit-Used"])
        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(call, range(400)))
        final = requests.get(base + "/api/messages", headers=headers, timeout=60)
    statuses = sorted({status for status, _ in results})
    assert statuses == [200, 403, 404]
    successes = [used for status, used in results if status == 200]
    assert len(successes) == 200
    assert all(1 <= used <= 200 + 32 for used in successes)
    assert final.status_code == 422 and final.headers["X-RateLimit-Used"] == "200"
    assert final.headers["X-RateLimit-Remaining"] == str(50000 - 200)
    with app.app_context():
        assert QuotaUsage.used_in(User.by_email("client@example.org").id,
                                  limits.quota_period()) == 200
