"""Webhooks in one process (issue 14, item 4): the routes and their answers
against /openapi.json, the URL policy at PUT and again at send time, the
outbox written in the delivery's own transaction, the retry schedule, the
attempt log, the purge and the API Management page; on SQLite and PostgreSQL.
The end-to-end runs through gunicorn and the daemon are in test_webhooks_live.py."""
from __future__ import annotations

import json
import os
import subprocess
from datetime import timedelta

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import event, func, select, update

import mailhandler
import retention
import storage
import webhook_worker
import webhooks
from models import ApiKey, Domain, Mailbox, Message, User, db
from test_accounts import make_user, post_form, sign_in
from test_openapi import operation_checker
from adversarial.helpers import VENV_BIN, write_config
from conftest import ROOT, free_port
from webhook_receiver import Receiver, Trickler, check_signature, self_signed
from webhooks import Webhook, WebhookOutbox

REFUSED = ["http://127.0.0.1:9/hook", "http://10.1.2.3/", "http://169.254.169.254/latest/meta-data",
           "http://[::1]/", "http://localhost:8080/", "http://0.0.0.0/", "http://[::ffff:127.0.0.1]/",
           "http://192.168.1.1/", "http://172.16.0.1/", "http://100.64.0.1/", "http://224.0.0.1/",
           "http://[fe80::1]/", "http://[fc00::1]/", "http://240.0.0.1/", "http://[2002:7f00:1::]/"]
INVALID = ["ftp://example.org/", "http://", "javascript:alert(1)", "http://user:pw@93.184.215.14/",
           "http://93.184.215.14:99999/", "https://" + "a" * 2100 + ".example/", "http://exa mple.org/",
           "http://no-such-host.invalid/"]


def keyed(app, email="hooks@example.org", plan="free") -> tuple[int, dict]:
    with app.app_context():
        user = User.create(email, plan=plan)
        _key, raw = ApiKey.issue(user)
        db.session.commit()
        return user.id, {"Authorization": f"Bearer {raw}"}


def owned_mailbox(app, user_id: int, name: str = "hookbox") -> str:
    with app.app_context():
        return Mailbox.create(name, Domain.by_name("example.com"), 3600, "user-api", user_id=user_id).address


def deliver(app, address: str, n: int = 1) -> None:
    with app.app_context():
        raw = f"From: a@peer.test\r\nTo: {address}\r\nSubject: hello {n}\r\n\r\nbody {n}\r\n".encode()
        mailhandler.deliver(raw, [address], "a@peer.test")


def outbox(app) -> list[WebhookOutbox]:
    with app.app_context():
        return list(db.session.scalars(select(WebhookOutbox).order_by(WebhookOutbox.id)))


# --------------------------------------------------------------------------
# the routes

def test_routes_answer_as_documented(app_factory):
    app = app_factory({"webhooks": {"allow_private": False}})
    client = app.test_client()
    check = operation_checker(client.get("/openapi.json").get_json())
    _uid, auth = keyed(app)

    def call(method, path, status, headers=auth, **kw):
        resp = client.open(path, method=method, headers=headers, **kw)
        assert resp.status_code == status, (method, path, resp.get_data(as_text=True)[:300])
        template = "/api/webhook/deliveries" if path.endswith("deliveries") else "/api/webhook"
        check(template, method, resp)
        return resp

    for method, path in (("GET", "/api/webhook"), ("PUT", "/api/webhook"), ("DELETE", "/api/webhook"),
                         ("GET", "/api/webhook/deliveries")):
        call(method, path, 401, headers={})
        if method != "PUT":
            assert call(method, path, 404).get_json() == {"status": False, "message": "No webhook is set."}
    call("PUT", "/api/webhook", 422, json={})
    call("PUT", "/api/webhook", 422, json={"url": 12345})
    used = int(call("GET", "/api/webhook", 404).headers["X-RateLimit-Used"])
    put = call("PUT", "/api/webhook", 200, json={"url": "https://93.184.215.14/hooks?x=1"})
    data = put.get_json()["data"]
    assert data["url"] == "https://93.184.215.14/hooks?x=1" and data["secret"].startswith("whsec_")
    assert int(put.headers["X-RateLimit-Used"]) == used + 1  # counted like any 2xx
    shown = call("GET", "/api/webhook", 200).get_json()["data"]
    assert "secret" not in shown and shown["url"] == data["url"] and shown["pending"] == 0
    assert call("GET", "/api/webhook/deliveries", 200).get_json() == {"status": True, "data": []}
    again = call("PUT", "/api/webhook", 200, data={"url": "http://93.184.215.14/other"}).get_json()["data"]
    assert again["secret"] != data["secret"]  # a form body works too; each PUT makes a new secret
    with app.app_context():
        assert db.session.scalar(select(func.count(Webhook.id))) == 1
    assert call("DELETE", "/api/webhook", 200).get_json() == {"status": True, "message": "Webhook was removed."}
    call("GET", "/api/webhook", 404)


def test_unsafe_or_invalid_urls_are_refused(app_factory):
    app = app_factory({"webhooks": {"allow_private": False}})
    _uid, auth = keyed(app)
    for url in REFUSED + INVALID:
        resp = app.test_client().put("/api/webhook", headers=auth, json={"url": url})
        assert resp.status_code == 422, url
        body = resp.get_json()
        assert body["status"] is False and body["message"].startswith("Invalid url"), (url, body)
        if url in REFUSED:
            assert "which is not a public address" in body["message"], (url, body)
    with app.app_context():
        assert db.session.scalar(select(func.count(Webhook.id))) == 0


def test_private_addresses_pass_when_allowed(app_factory):
    app = app_factory({"webhooks": {"allow_private": True}})
    _uid, auth = keyed(app)
    for url in ("http://127.0.0.1:9/hook", "http://localhost/", "http://[::1]/", "http://10.0.0.1/"):
        assert app.test_client().put("/api/webhook", headers=auth, json={"url": url}).status_code == 200, url
    for url in ("ftp://127.0.0.1/", "http://user:pw@127.0.0.1/"):
        assert app.test_client().put("/api/webhook", headers=auth, json={"url": url}).status_code == 422, url


def test_public_address_check():
    assert webhooks.is_public("93.184.215.14") and webhooks.is_public("2606:4700:4700::1111")
    for address in ("127.0.0.1", "10.0.0.1", "169.254.1.1", "::1", "0.0.0.0", "::", "fe80::1%eth0",
                    "::ffff:10.0.0.1", "2002:a00:1::", "224.0.0.1", "ff02::1", "198.18.0.1", "not an ip"):
        assert not webhooks.is_public(address), address


# --------------------------------------------------------------------------
# the outbox

def count_statements(app):
    """SQL statements run through the app's engine, collected while the test runs."""
    seen: list[str] = []
    with app.app_context():
        event.listen(db.engine, "before_cursor_execute", lambda *a: seen.append(a[2]))
    return seen


def test_outbox_rows_come_with_the_message_and_cost_nothing_without_owners(app_factory, monkeypatch):
    app = app_factory()
    uid, _auth = keyed(app)
    box = owned_mailbox(app, uid)
    with app.app_context():
        anon = Mailbox.create("anonbox", Domain.by_name("example.com"), 3600).address
    seen = count_statements(app)
    deliver(app, anon)
    assert not [s for s in seen if "webhooks" in s]  # mail nobody owns: not even a query
    deliver(app, box)  # owned, but no webhook: one query, no row
    assert len([s for s in seen if "FROM webhooks" in s]) == 1 and outbox(app) == []
    with app.app_context():
        webhooks.set_webhook(uid, "http://93.184.215.14/hook", "https://mail.example.net")
        db.session.commit()
    deliver(app, box, 2)
    [row] = outbox(app)
    body = json.loads(row.payload)
    assert body["event"] == "message.received" and body["mailbox"] == box
    assert body["message"]["subject"] == "hello 2" and body["message"]["is_seen"] is False
    assert row.next_at is not None and row.attempts == 0 and len(row.event_id) == 32
    # A delivery whose commit fails leaves neither the message nor its event.
    monkeypatch.setattr(storage, "commit_durably", fail_commit)
    with pytest.raises(mailhandler.StoreFailed):
        deliver(app, box, 3)
    assert len(outbox(app)) == 1
    with app.app_context():
        assert db.session.scalar(select(func.count()).where(Message.subject == "hello 3")) == 0


def fail_commit(_pending):
    raise OSError("disk gone")


def test_payload_links_use_the_url_the_webhook_was_set_through(app_factory):
    app = app_factory({"webhooks": {"allow_private": True}})
    uid, auth = keyed(app)
    box = owned_mailbox(app, uid)
    app.test_client().put("/api/webhook", headers=auth, json={"url": "http://127.0.0.1:9/"},
                          base_url="https://mail.example.net")
    with app.app_context():
        raw = (f"From: a@peer.test\r\nTo: {box}\r\nSubject: file\r\nMIME-Version: 1.0\r\n"
               "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
               "--b\r\nContent-Type: text/plain; name=a.txt\r\nContent-Disposition: attachment; filename=a.txt"
               "\r\n\r\nfile\r\n--b--\r\n").encode()
        mailhandler.deliver(raw, [box], "a@peer.test")
    message = json.loads(outbox(app)[0].payload)["message"]
    shown = app.test_client().get(f"/api/messages/{message['id']}", headers=auth,
                                  base_url="https://mail.example.net").get_json()["data"]
    assert message == dict(shown, is_seen=False)
    assert message["attachments"][0]["url"].startswith("https://mail.example.net/api/messages/")


# --------------------------------------------------------------------------
# sending in process: the send-time check, the schedule, the attempt log

def test_rebound_address_is_refused_at_send_time(app_factory):
    """A name that resolved to a public address when it was set, and to an
    inner one now (DNS rebinding): the sender checks the address it connects to."""
    app = app_factory({"webhooks": {"allow_private": False}})
    receiver = Receiver()
    try:
        uid, auth = keyed(app)
        box = owned_mailbox(app, uid)
        with app.app_context():  # as if the name had pointed elsewhere at PUT time
            webhooks.set_webhook(uid, receiver.url(), "http://localhost")
            db.session.commit()
        deliver(app, box)
        refusals = refused_count()
        result = app.test_cli_runner().invoke(args=["webhooks", "run", "--once"])
        assert result.exit_code == 0 and "1 webhook attempts made" in result.output, result.output
        assert receiver.requests == [] and refused_count() == refusals + 1
        [attempt] = app.test_client().get("/api/webhook/deliveries", headers=auth).get_json()["data"]
        assert attempt["status_code"] is None and attempt["ok"] is False
        assert "127.0.0.1, which is not a public address" in attempt["error"]
        [row] = outbox(app)
        assert row.next_at is not None and row.delivered_at is None  # retried later: DNS may change back
    finally:
        receiver.close()


def refused_count() -> float:
    return REGISTRY.get_sample_value("tempmail_webhook_attempts_total", {"outcome": "refused"}) or 0


def test_schedule_first_retry_within_a_minute_and_gives_up_after_a_day(app):
    with app.app_context():
        conf = app.config["TEMPMAIL"]["webhooks"]
        created = t = webhook_worker.clock.now()
        first = webhook_worker.next_attempt(created, 1, t)
        assert first - t <= timedelta(seconds=60)
        delays, attempt = [], 1
        while (due := webhook_worker.next_attempt(created, attempt, t)) is not None:
            delays.append((due - t).total_seconds())
            t, attempt = due, attempt + 1
        # each delay at least the one before (up to the jitter), and doubling until the cap
        assert all(b * (1 + webhook_worker.JITTER) >= a for a, b in zip(delays, delays[1:]))
        assert delays[3] >= 4 * conf["retry_base_seconds"]
        assert max(delays) <= conf["retry_max_seconds"] * (1 + webhook_worker.JITTER)
        assert timedelta(hours=22) < t - created <= timedelta(seconds=conf["retry_for_seconds"])


def test_attempt_log_keeps_fifty_and_finished_events_are_purged(app_factory, clock):
    app = app_factory({"webhooks": {"allow_private": True, "retry_base_seconds": 1, "retry_max_seconds": 1,
                                    "retry_for_seconds": 3600}})
    receiver = Receiver(default=500)
    try:
        uid, auth = keyed(app)
        box = owned_mailbox(app, uid)
        with app.app_context():
            _hook, secret = webhooks.set_webhook(uid, receiver.url(), "http://localhost")
            db.session.commit()
        deliver(app, box)
        for _ in range(55):
            drain(app)
            clock.advance(2)
        attempts = app.test_client().get("/api/webhook/deliveries", headers=auth).get_json()["data"]
        assert [a["attempt"] for a in attempts] == list(range(55, 5, -1))
        assert {a["error"] for a in attempts} == {"HTTP 500"} and {a["status_code"] for a in attempts} == {500}
        assert len({r.delivery for r in receiver.requests}) == 1 and len(receiver.requests) == 55
        for got in receiver.requests[::10]:
            check_signature(secret, got)
        receiver.default = 204
        drain(app)
        [row] = outbox(app)
        assert row.delivered_at is not None and row.next_at is None and row.attempts == 56
        deliver(app, box, 2)  # a second event, never delivered: given up after retry_for_seconds
        receiver.default = 503
        clock.advance(3700)
        drain(app)
        given_up = outbox(app)[1]
        assert given_up.next_at is None and given_up.delivered_at is None and given_up.attempts == 1
        clock.advance(7200)
        with app.app_context():
            assert retention.run_purge(orphans=False)["webhook_events"] == 2
        assert outbox(app) == []
    finally:
        receiver.close()


def drain(app) -> int:
    return webhook_worker.Worker(app).drain()


def test_two_senders_never_hold_the_same_event(app_factory):
    app = app_factory()
    uid, _auth = keyed(app)
    box = owned_mailbox(app, uid)
    with app.app_context():
        webhooks.set_webhook(uid, "http://93.184.215.14/hook", "http://localhost")
        db.session.commit()
    for n in range(6):
        deliver(app, box, n)
    with app.app_context():
        first = webhook_worker.claim_due(4)
        second = webhook_worker.claim_due(10)
        assert len(first) == 4 and len(second) == 2
        assert not {c.id for c in first} & {c.id for c in second}
        assert webhook_worker.claim_due(10) == []
        # A claim that outlived its lease (a killed sender) is free again.
        db.session.execute(update(WebhookOutbox).values(claimed_until=webhook_worker.clock.now()
                                                        - timedelta(seconds=1)))
        db.session.commit()
        assert len(webhook_worker.claim_due(10)) == 6


# --------------------------------------------------------------------------
# API Management

def test_page_sets_shows_and_removes_the_webhook(app_factory):
    app = app_factory({"webhooks": {"allow_private": True}})
    client = app.test_client()
    make_user(app)
    sign_in(client)
    page = client.get("/account").get_data(as_text=True)
    assert 'action="/account/webhook"' in page and "Set webhook" in page
    assert client.post("/account/webhook", data={"url": "http://127.0.0.1:9/"}).status_code == 400  # no CSRF
    bad = post_form(client, "/account/webhook", {"url": "ftp://x.example/"}, "/account")
    assert bad.status_code == 400 and "Enter an http or https URL" in bad.get_data(as_text=True)
    made = post_form(client, "/account/webhook", {"url": "http://127.0.0.1:9/hook"}, "/account")
    text = made.get_data(as_text=True)
    assert made.status_code == 201 and made.headers["Cache-Control"] == "no-store"
    with app.app_context():
        secret = db.session.scalar(select(Webhook.secret))
    assert f'data-testid="webhook-secret">{secret}<' in text
    later = client.get("/account").get_data(as_text=True)
    assert secret not in later and 'data-testid="webhook-url">http://127.0.0.1:9/hook<' in later
    assert "No delivery attempted yet." in later
    gone = post_form(client, "/account/webhook/remove", {}, "/account")
    assert gone.status_code == 303
    assert 'data-testid="webhook-url"' not in client.get("/account").get_data(as_text=True)
    with app.app_context():
        assert db.session.scalar(select(func.count(Webhook.id))) == 0


def test_page_lists_recent_attempts(app_factory):
    app = app_factory({"webhooks": {"allow_private": True}})
    receiver = Receiver(default=502)
    try:
        client = app.test_client()
        uid = make_user(app)
        sign_in(client)
        post_form(client, "/account/webhook", {"url": receiver.url()}, "/account")
        with app.app_context():
            box = Mailbox.create("pagebox", Domain.by_name("example.com"), 3600, "user-api", user_id=uid).address
        deliver(app, box)
        drain(app)
        page = client.get("/account").get_data(as_text=True)
        assert 'data-testid="webhook-deliveries"' in page and "HTTP 502" in page
        assert receiver.requests[0].delivery in page
    finally:
        receiver.close()


# --------------------------------------------------------------------------
# receivers that misbehave, and HTTPS

def test_slow_silent_refusing_and_untrusted_receivers_fail_within_the_deadline(app_factory, tmp_path):
    """A receiver trickling one byte every 0.2 s never trips a socket
    timeout; only the attempt's overall deadline can end it."""
    app = app_factory({"webhooks": {"allow_private": True, "timeout_seconds": 1}})
    uid, auth = keyed(app)
    box = owned_mailbox(app, uid)
    drip, silent = Trickler(0.2), Trickler(None)
    untrusted = Receiver(tls=self_signed(tmp_path))
    try:
        cases = [(f"http://127.0.0.1:{drip.port}/", "no answer within 1 s"),
                 (f"http://127.0.0.1:{silent.port}/", "no answer within 1 s"),
                 (f"http://127.0.0.1:{free_port()}/", "connection refused"),
                 (untrusted.url(host="localhost"), "TLS certificate not accepted")]
        for n, (url, error) in enumerate(cases):
            with app.app_context():
                webhooks.set_webhook(uid, url, "http://localhost")
                db.session.commit()
            deliver(app, box, n)
            assert drain(app) == 1
            latest = app.test_client().get("/api/webhook/deliveries", headers=auth).get_json()["data"][0]
            assert latest["status_code"] is None and error in latest["error"], (url, latest)
        assert untrusted.requests == [] and drip.connections == silent.connections == 1
    finally:
        drip.close()
        silent.close()
        untrusted.close()


def test_https_receiver_is_reached_on_the_checked_address_with_its_name(app_factory, tmp_path):
    """``flask webhooks run --once`` connects to the checked address while
    TLS (SNI, certificate) and Host use the URL's name."""
    cert, key = self_signed(tmp_path)
    receiver = Receiver(tls=(cert, key))
    try:
        app = app_factory({"webhooks": {"allow_private": True}})
        uid, _auth = keyed(app)
        box = owned_mailbox(app, uid)
        with app.app_context():
            _hook, secret = webhooks.set_webhook(uid, receiver.url("/in?src=tm", host="localhost"), "http://x")
            db.session.commit()
        deliver(app, box)
        env = dict(os.environ, TEMPMAIL_CONFIG=str(write_config(app, tmp_path / "config.json")),
                   SSL_CERT_FILE=str(cert))
        env.pop("DATABASE_URL", None)
        done = subprocess.run([str(VENV_BIN / "flask"), "--app", "app", "webhooks", "run", "--once"], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and "1 webhook attempts made." in done.stdout, done.stderr
        [got] = receiver.requests
        assert got.path == "/in?src=tm" and got.headers["Host"] == f"localhost:{receiver.port}"
        check_signature(secret, got)
        [row] = outbox(app)
        assert row.delivered_at is not None and row.last_status == 204
    finally:
        receiver.close()


def test_page_says_why_a_url_is_refused_in_the_readers_language(app_factory):
    app = app_factory({"webhooks": {"allow_private": False}})
    client = app.test_client()
    make_user(app)
    sign_in(client)
    client.get("/account?lang=it")
    refused = post_form(client, "/account/webhook", {"url": "http://10.9.8.7/"}, "/account")
    text = refused.get_data(as_text=True)
    assert refused.status_code == 400 and 'lang="it"' in text
    assert "10.9.8.7 si risolve in 10.9.8.7, che non è un indirizzo pubblico." in text
