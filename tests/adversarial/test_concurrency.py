"""Concurrency: gunicorn with 4 workers and the mail daemon write the same
database at once (SQLite file, then PostgreSQL). No client ever sees
"database is locked", a 5xx or a 4xx SMTP reply."""
from __future__ import annotations

import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from .helpers import Daemon, Gunicorn, build_message, record, send_one, write_config
from .test_nothing_lost import make_mailboxes

SECONDS = 5.0
HTTP_CLIENTS, SMTP_CLIENTS = 8, 4


class Mixed:
    """API clients that read, mark read, delete and generate while SMTP
    clients deliver; tallies every answer."""

    def __init__(self, web: Gunicorn, daemon: Daemon, addresses: list[str]):
        self.web, self.daemon, self.addresses = web, daemon, addresses
        self.http, self.smtp = Counter(), Counter()
        self.locked: list[str] = []
        self.deadline = time.monotonic() + SECONDS
        self.lock = threading.Lock()

    def note_http(self, resp: requests.Response) -> None:
        with self.lock:
            self.http[resp.status_code] += 1
            if "locked" in resp.text.lower():
                self.locked.append(resp.text[:200])

    def http_client(self, seed: int) -> None:
        rng, session = random.Random(seed), requests.Session()
        while time.monotonic() < self.deadline:
            address = rng.choice(self.addresses)
            inbox = session.get(f"{self.web.url}/api.php/inbox/{address}", timeout=60)
            self.note_http(inbox)
            emails = inbox.json().get("emails", []) if inbox.status_code == 200 else []
            if emails:
                pick = rng.choice(emails)["id"]
                method = "DELETE" if rng.random() < 0.3 else "GET"
                self.note_http(session.request(method, f"{self.web.url}/api.php/email/{pick}", timeout=60))
            if rng.random() < 0.2:
                self.note_http(session.get(f"{self.web.url}/api.php/generate", timeout=60))
            if rng.random() < 0.2:
                self.note_http(session.get(f"{self.web.url}/api.php/stats", timeout=60))

    def smtp_client(self, seed: int) -> None:
        rng, n = random.Random(seed), seed * 100000
        while time.monotonic() < self.deadline:
            n += 1
            rcpt = rng.choice(self.addresses)
            code, _ = send_one(self.daemon.port, rcpt, build_message(n, rcpt, tag="conc"), timeout=60)
            with self.lock:
                self.smtp[code] += 1


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_gunicorn_4_workers_and_daemon_share_the_database(app, tmp_path, backend):
    addresses = make_mailboxes(app, 10, "conc")
    config = write_config(app, tmp_path / "conc.json", rate_limits={})
    web = Gunicorn(config, tmp_path / "gunicorn.log", workers=4).start()
    daemon = Daemon(config, tmp_path / "smtpd.log").start()
    load = Mixed(web, daemon, addresses)
    try:
        with ThreadPoolExecutor(HTTP_CLIENTS + SMTP_CLIENTS) as pool:
            jobs = [pool.submit(load.http_client, i) for i in range(HTTP_CLIENTS)]
            jobs += [pool.submit(load.smtp_client, i + 1) for i in range(SMTP_CLIENTS)]
            for job in jobs:
                job.result(timeout=300)
    finally:
        web.stop()
        daemon.stop()
    logs = (tmp_path / "gunicorn.log").read_text(errors="replace") + (tmp_path / "smtpd.log").read_text(
        errors="replace")
    record("concurrency", f"{backend}: {SECONDS:.0f} s of gunicorn x4 + daemon: HTTP {dict(sorted(load.http.items()))}, "
           f"SMTP {dict(sorted(load.smtp.items()))}; 'locked' seen by clients {len(load.locked)}, "
           f"in server logs {logs.lower().count('database is locked')}")
    assert load.locked == []
    assert not [code for code in load.http if code >= 500]
    assert set(load.smtp) == {250}
    assert sum(load.http.values()) > 0 and load.smtp[250] > 0
    assert "database is locked" not in logs.lower()
