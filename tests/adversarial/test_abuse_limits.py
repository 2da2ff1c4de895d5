"""Abuse limits: mailbox creation per client IP on every creation path
(api.php /generate, the web page, the User API), failed sign-ins, a cap on
live mailboxes, and a cap on messages per mailbox enforced at delivery."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from sqlalchemy import func, select

import mailhandler
import mailpolicy
from models import ApiKey, Domain, Mailbox, Message, User, db

from .helpers import Gunicorn, build_message, in_process_session, record

LIMITS = {"mailbox_create": {"limit": 3, "window_seconds": 60},
          "api_mailbox_create": {"limit": 2, "window_seconds": 60},
          "login": {"limit": 3, "window_seconds": 900}}


def api_key(app) -> str:
    with app.app_context():
        user = User.create("limits@users.test", password="correct horse battery")
        _, raw = ApiKey.issue(user)
        db.session.commit()
        return raw


def statuses(responses) -> list[int]:
    return [r.status_code for r in responses]


def test_mailbox_creation_is_limited_per_client_ip(app_factory, clock):
    app = app_factory({"rate_limits": LIMITS, "behind_proxy": True})
    client = app.test_client()
    ip = lambda addr: {"X-Forwarded-For": addr}  # noqa: E731 - the proxy's header names the client
    generate = statuses(client.get("/generate", headers=ip("198.51.100.1")) for _ in range(5))
    other_ip = client.get("/generate", headers=ip("198.51.100.2")).status_code
    # every cookie-less visit of the page would create a mailbox: same limit
    web = statuses(app.test_client().get("/", headers=ip("198.51.100.3")) for _ in range(5))
    web_new = app.test_client()
    web_new.get("/", headers=ip("198.51.100.4"))
    key = {"Authorization": f"Bearer {api_key(app)}", **ip("198.51.100.5")}
    api = statuses(client.post("/api/emails", headers=key) for _ in range(4))
    clock.advance(60)
    after_window = client.get("/generate", headers=ip("198.51.100.1")).status_code
    record("abuse limits", f"mailbox creation per client IP (limit 3/60 s): /generate {generate}, another "
           f"IP {other_ip}, web page {web}; User API (limit 2) {api}; after the window {after_window}")
    assert generate == [200, 200, 200, 429, 429] and other_ip == 200
    assert web == [200, 200, 200, 429, 429]
    assert api == [200, 200, 429, 429]
    assert after_window == 200


def test_failed_sign_ins_are_limited(app_factory):
    app = app_factory({"rate_limits": LIMITS}, WTF_CSRF_ENABLED=False)  # CSRF has its own test
    api_key(app)
    client = app.test_client()
    tries = statuses(client.post("/signin", data={"email": "limits@users.test", "password": f"wrong{i}"})
                     for i in range(5))
    right = client.post("/signin", data={"email": "limits@users.test", "password": "correct horse battery"})
    record("abuse limits", f"sign-in (limit 3 failures): wrong passwords {tries}, then the right one "
           f"{right.status_code} until the window ends")
    assert tries == [401, 401, 401, 429, 429] and right.status_code == 429


def test_live_mailboxes_are_capped(app_factory):
    app = app_factory({"max_live_mailboxes": 3, "rate_limits": {}})
    client = app.test_client()
    key = {"Authorization": f"Bearer {api_key(app)}"}
    legacy = statuses(client.get("/generate") for _ in range(4))
    web = app.test_client().get("/").status_code
    api = client.post("/api/emails", headers=key).status_code
    with app.app_context():
        live = db.session.scalar(select(func.count(Mailbox.id)))
    record("abuse limits", f"max_live_mailboxes=3: /generate {legacy}, web page {web}, User API {api}; "
           f"{live} mailboxes exist")
    assert legacy == [200, 200, 200, 503] and web == 503 and api == 503 and live == 3


def test_messages_per_mailbox_are_capped_at_delivery(app_factory):
    app = app_factory({"max_messages_per_mailbox": 5})
    with app.app_context():
        box = Mailbox.create("capped", Domain.by_name("example.com"), 86400)
        for n in range(12):
            mailhandler.deliver(build_message(n, box.address, tag="cap"), [box.address])
        subjects = list(db.session.scalars(select(Message.subject).order_by(Message.id)))
    record("abuse limits", f"max_messages_per_mailbox=5: 12 delivered, {len(subjects)} kept (the newest)")
    assert subjects == [f"cap message {n}" for n in range(7, 12)]


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_catch_all_addresses_count_against_the_live_mailbox_cap(app_factory):
    app = app_factory({"max_live_mailboxes": 3, "catch_all": True, "rate_limits": {}})
    with app.app_context():
        Mailbox.create("alice", Domain.by_name("example.com"), 3600)
    codes = []
    with in_process_session(app) as conn:
        for local in ("fresh1", "fresh2", "fresh3", "alice"):
            conn.mail("sender@example.org")
            code, _ = conn.rcpt(f"{local}@example.com")
            if code == 250:
                code = conn.data(f"Subject: cap {local}\r\n\r\nbody\r\n".encode())[0]
            else:
                conn.rset()
            codes.append(code)
    with app.app_context():
        try:  # a transport without RCPT (IMAP ingest, flask import) meets the same rule
            mailhandler.deliver(build_message(1, "fresh4@example.com", tag="cap"), ["fresh4@example.com"])
            direct = "stored"
        except mailpolicy.DeliveryError as exc:
            direct = exc.smtp_reply
        boxes = sorted(db.session.scalars(select(Mailbox.address)))
        alice = db.session.scalar(select(func.count(Message.id)).join(Mailbox)
                                  .where(Mailbox.address == "alice@example.com"))
    record("abuse limits", f"max_live_mailboxes=3, catch-all: SMTP to 2 new names, a 3rd, an existing "
           f"mailbox -> {codes}; without RCPT: {direct}")
    assert codes == [250, 250, 452, 250]
    assert direct.startswith("452 4.3.1")
    assert boxes == ["alice@example.com", "fresh1@example.com", "fresh2@example.com"] and alice == 1


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_live_mailbox_cap_is_exact_through_parallel_workers(app_factory, tmp_path):
    """40 parallel /generate through gunicorn's workers (as ``make
    run``), 2 places left: exactly 2 mailboxes are made, the rest 503."""
    app = app_factory({"max_live_mailboxes": 5, "rate_limits": {"mailbox_create": {"limit": 0}}})
    with app.app_context():
        for name in ("held1", "held2", "held3"):
            Mailbox.create(name, Domain.by_name("example.com"), 3600)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(app.config["TEMPMAIL"], secret_key=app.config["SECRET_KEY"])))
    deploy = Path(__file__).resolve().parents[2] / "deploy" / "gunicorn.conf.py"
    server = Gunicorn(config, tmp_path / "gunicorn.log", workers=2, extra=["--config", str(deploy)]).start()
    try:
        with ThreadPoolExecutor(max_workers=40) as pool:
            codes = list(pool.map(lambda _n: requests.get(server.url + "/api.php/generate", timeout=60).status_code,
                                  range(40)))
    finally:
        server.stop()
    with app.app_context():
        live = db.session.scalar(select(func.count(Mailbox.id)))
    record("abuse limits", f"max_live_mailboxes=5 with 3 live: 40 parallel /generate through 2 workers -> "
           f"{codes.count(200)} made, {codes.count(503)} refused; {live} mailboxes exist")
    assert codes.count(200) == 2 and codes.count(503) == 38 and live == 5, sorted(codes)
