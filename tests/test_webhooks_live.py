"""Webhooks end to end (issue 14, item 4), on SQLite and PostgreSQL: gunicorn
serves the User API, the real ``flask smtpd`` stores mail over SMTP and sends
the events, and receivers on 127.0.0.1 check each signature. A failing
receiver is retried until it recovers, redirects are not followed, a SIGKILL
of the daemon loses no event, and the receivers /docs shows (Python, Node.js,
PHP, and the cURL test event) verify real deliveries."""
from __future__ import annotations

import html
import json
import os
import queue
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest
import requests

import mailhandler
import webhooks
from adversarial.helpers import VENV_BIN, Daemon, Gunicorn, build_message, record, send_one, write_config
from conftest import ROOT, free_port, wait_for_port
from models import ApiKey, Domain, Mailbox, User, db
from webhook_receiver import Receiver, check_signature

VENV_FLASK = VENV_BIN / "flask"
# Retries in fractions of a second and a 1 s deadline, so the test takes
# seconds; the schedule itself is the configured one (tests/test_webhooks.py
# checks the defaults: first retry within a minute, given up after a day).
FAST = {"allow_private": True, "timeout_seconds": 1, "retry_base_seconds": 0.3, "retry_max_seconds": 1,
        "poll_seconds": 0.2}


@pytest.fixture
def stack(app_factory, tmp_path):
    app = app_factory({"webhooks": FAST})
    config = write_config(app, tmp_path / "config.json")
    web = Gunicorn(config, tmp_path / "gunicorn.log", workers=2).start()
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    receivers: list = []
    yield SimpleNamespace(app=app, web=web, daemon=daemon, receivers=receivers)
    daemon.stop()
    web.stop()
    for receiver in receivers:
        receiver.close()


def user_api(stack, email: str = "hooks@example.org") -> requests.Session:
    """A requests session for gunicorn with a new user's key; ``.url(path)`` builds URLs."""
    with stack.app.app_context():
        _key, raw = ApiKey.issue(User.create(email))
        db.session.commit()
    session = requests.Session()
    session.headers["Authorization"] = f"Bearer {raw}"
    session.url = lambda path: stack.web.url + path
    return session


def receiver_for(stack, **kw) -> Receiver:
    receiver = Receiver(**kw)
    stack.receivers.append(receiver)
    return receiver


def mailbox_with_webhook(stack, api, url: str) -> tuple[str, str]:
    box = api.post(api.url("/api/emails"), timeout=30).json()["data"]["email"]
    put = api.put(api.url("/api/webhook"), json={"url": url}, timeout=30)
    assert put.status_code == 200, put.text
    return box, put.json()["data"]["secret"]


def attempts(api, count: int, timeout: float = 30) -> list[dict]:
    """The attempt log once it lists at least ``count`` attempts (the sender
    records an attempt just after the receiver has answered it)."""
    deadline = time.monotonic() + timeout
    while True:
        data = api.get(api.url("/api/webhook/deliveries"), timeout=30).json()["data"]
        if len(data) >= count or time.monotonic() > deadline:
            return data
        time.sleep(0.1)


def attempt_of(api, delivery: str, timeout: float = 30) -> dict:
    """The logged attempt of ``delivery`` (the sender records it just after
    the receiver answered; earlier webhooks' attempts may be listed first)."""
    deadline = time.monotonic() + timeout
    while True:
        data = api.get(api.url("/api/webhook/deliveries"), timeout=30).json()["data"]
        found = [entry for entry in data if entry["delivery_id"] == delivery]
        if found or time.monotonic() > deadline:
            return found[0] if found else {"delivery_id": None, "status_code": None}
        time.sleep(0.1)


def send_acked(port: int, box: str, data: bytes) -> None:
    """Send until the daemon answers 250, waiting through a restart."""
    while True:
        try:
            if send_one(port, box, data, timeout=10)[0] == 250:
                return
        except (smtplib.SMTPException, OSError):
            pass
        time.sleep(0.05)


def event_of(got) -> dict:
    return json.loads(got.body)


def test_events_are_signed_retried_and_redirects_not_followed(stack):
    api = user_api(stack)
    receiver = receiver_for(stack)
    receiver.answer(500, 500)  # down for the first two attempts, then it recovers
    box, secret = mailbox_with_webhook(stack, api, receiver.url("/hook"))
    assert send_one(stack.daemon.port, box, build_message(1, box, tag="signed"))[0] == 250
    got = receiver.wait_for(lambda rs: any(r.answered == 204 for r in rs))
    assert [r.answered for r in got] == [500, 500, 204]
    assert len({r.delivery for r in got}) == 1 and re.fullmatch("[0-9a-f]{32}", got[0].delivery)
    for one in got:
        check_signature(secret, one)
        assert one.path == "/hook" and one.headers["Content-Type"] == "application/json"
        assert one.headers["TempMail-Event"] == "message.received" and one.body == got[0].body
    listed = api.get(api.url(f"/api/messages?email={box}"), timeout=30).json()["messages"]
    shown = api.get(api.url(f"/api/messages/{listed[0]['id']}"), timeout=30).json()["data"]
    assert event_of(got[-1]) == {"event": "message.received", "mailbox": box,
                                 "message": dict(shown, is_seen=False)}
    log = attempts(api, 3)
    assert [(a["attempt"], a["status_code"], a["ok"], a["error"]) for a in log] == [
        (3, 204, True, None), (2, 500, False, "HTTP 500"), (1, 500, False, "HTTP 500")]
    assert {a["delivery_id"] for a in log} == {got[0].delivery}
    assert api.get(api.url("/api/webhook"), timeout=30).json()["data"]["pending"] == 0

    receiver.default = 302  # a redirect elsewhere is a failure, never followed
    assert send_one(stack.daemon.port, box, build_message(2, box, tag="signed"))[0] == 250
    redirected = receiver.wait_for(lambda rs: sum(r.answered == 302 for r in rs) >= 2)
    assert all(r.path == "/hook" for r in redirected)  # nothing went to /elsewhere, by GET or POST
    assert len({r.delivery for r in redirected if r.answered == 302}) == 1
    log = attempts(api, 5)
    assert log[0]["status_code"] == 302 and log[0]["error"] == "HTTP 302 (redirects are not followed)"
    record("webhooks", f"{stack.app.config['SQLALCHEMY_DATABASE_URI'].split(':')[0]}: 500, 500, then 204 "
                       "delivered with one delivery id; 302 retried, never followed")


def test_no_event_is_lost_when_the_daemon_is_killed(stack):
    count = 40
    api = user_api(stack)
    receiver = receiver_for(stack)
    box, secret = mailbox_with_webhook(stack, api, receiver.url())
    sender = threading.Thread(target=lambda: [
        send_acked(stack.daemon.port, box, build_message(n, box, tag="kill")) for n in range(count)])
    receiver.hold(10)  # the 10th event is in flight, unanswered, when the daemon dies
    sender.start()
    receiver.wait_for(lambda rs: len(rs) >= 10)
    stack.daemon.kill()  # SIGKILL while mail arrives and events go out
    receiver.release()
    stack.daemon.start()
    sender.join(timeout=120)
    wanted = {f"kill message {n}" for n in range(count)}
    got = receiver.wait_for(lambda rs: {event_of(r)["message"]["subject"] for r in rs} >= wanted, timeout=120)
    # The event whose answer the kill cut off goes out again once its claim expires.
    held = got[9].delivery
    got = receiver.wait_for(lambda rs: sum(r.delivery == held for r in rs) >= 2, timeout=60)
    ids: dict[str, set] = {}
    for one in got:
        check_signature(secret, one)
        ids.setdefault(event_of(one)["message"]["subject"], set()).add(one.delivery)
    assert set(ids) == wanted
    assert all(len(found) == 1 for found in ids.values())  # a repeat carries its event's own id
    assert len({next(iter(found)) for found in ids.values()}) == count
    record("webhooks", f"SIGKILL of the daemon during {count} messages: {count} events, none lost; "
                       f"{len(got) - count} sent twice (same delivery id)")


# --------------------------------------------------------------------------
# the receivers of /docs, run for real

def docs_samples(stack) -> dict:
    """The verify samples of /docs, as a reader copies them."""
    page = requests.get(stack.web.url + "/docs", timeout=30).text
    found = re.findall(r'id="panel-webhook-verify-(\w+)".*?<pre><code>(.*?)</code></pre>', page, re.S)
    return {sid: html.unescape(code) for sid, code in found}


class Process:
    """A receiver sample in a subprocess; its output lines in a queue."""

    def __init__(self, command: list[str], port: int, secret: str, cwd):
        env = dict(os.environ, PORT=str(port), TEMPMAIL_WEBHOOK_SECRET=secret)
        self.proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stdout], daemon=True).start()
        wait_for_port(port)

    def line_with(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.5)
            except queue.Empty:
                continue
            if text in line:
                return line.strip()
        raise AssertionError(f"no line with {text!r}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


COMMANDS = {"python": lambda path, port: [sys.executable, str(path)],
            "js": lambda path, port: [shutil.which("node") or "node", str(path)],
            "php": lambda path, port: [shutil.which("php") or "php", "-S", f"127.0.0.1:{port}", str(path)]}
SUFFIX = {"python": ".py", "js": ".js", "php": ".php"}


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_the_docs_receivers_verify_real_deliveries(stack, tmp_path):
    samples = docs_samples(stack)
    assert set(samples) == {"curl", "js", "python", "php"}
    api = user_api(stack)
    box = api.post(api.url("/api/emails"), timeout=30).json()["data"]["email"]
    for n, sid in enumerate(("python", "js", "php")):
        path = tmp_path / f"receiver{SUFFIX[sid]}"
        path.write_text(samples[sid])
        port = free_port()
        url = f"http://127.0.0.1:{port}/tempmail-webhook"
        secret = api.put(api.url("/api/webhook"), json={"url": url}, timeout=30).json()["data"]["secret"]
        proc = Process(COMMANDS[sid](path, port), port, secret, tmp_path)
        try:
            assert send_one(stack.daemon.port, box, build_message(n, box, tag=sid))[0] == 250
            line = proc.line_with(f"{box} {sid} message {n}")
            delivery = re.search(r"([0-9a-f]{32}) " + re.escape(box), line).group(1)
            log = attempt_of(api, delivery)
            assert (log["delivery_id"], log["status_code"]) == (delivery, 204)
            assert_forgeries_refused(url, secret)
        finally:
            proc.stop()
    check_curl_sample(samples, tmp_path)


def assert_forgeries_refused(url: str, secret: str) -> None:
    """A wrong signature and a correct but stale one are both turned away."""
    import hashlib
    import hmac
    body = b'{"event":"message.received","mailbox":"x@example.com","message":{"subject":"forged"}}'
    stale = int(time.time()) - 3600
    good_mac = hmac.new(secret.encode(), f"{stale}.".encode() + body, hashlib.sha256).hexdigest()
    for header in (f"t={int(time.time())},v1={'0' * 64}", f"t={stale},v1={good_mac}", "", "garbage"):
        resp = requests.post(url, data=body, headers={"TempMail-Signature": header,
                                                      "Content-Type": "application/json"}, timeout=10)
        assert resp.status_code == 400, (url, header)


def check_curl_sample(samples: dict, tmp_path) -> None:
    """The cURL tab signs a test event with openssl as the server signs: the
    Python receiver, started with the sample's secret, accepts it."""
    from docs_content import EXAMPLE_SECRET, HOOK_URL
    port = free_port()
    path = tmp_path / "receiver_for_curl.py"
    path.write_text(samples["python"])
    proc = Process([sys.executable, str(path)], port, EXAMPLE_SECRET, tmp_path)
    try:
        script = samples["curl"].replace(HOOK_URL, f"http://127.0.0.1:{port}/tempmail-webhook")
        done = subprocess.run(["bash", "-c", script + " --fail --silent --show-error"], capture_output=True,
                              text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert proc.line_with("00000000000000000000000000000000 demo123@example.com Test event")
    finally:
        proc.stop()


# --------------------------------------------------------------------------
# where senders run: one per daemon, and any number of `flask webhooks run`

def flask_env(config) -> dict:
    env = dict(os.environ, TEMPMAIL_CONFIG=str(config))
    env.pop("DATABASE_URL", None)
    return env


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_supervised_daemon_runs_one_sender(app_factory, tmp_path):
    """``smtp.processes`` = 2: mail arrives in either receiver process, and
    the one sender (slot 0, beside the purge timer) delivers every event."""
    app = app_factory({"webhooks": FAST, "smtp": {"processes": 2}})
    receiver = Receiver()
    daemon = Daemon(write_config(app, tmp_path / "config.json"), tmp_path / "daemon.log")
    try:
        with app.app_context():
            user = User.create("procs@example.org")
            db.session.flush()
            box = Mailbox.create("procbox", Domain.by_name("example.com"), 3600, "user-api", user_id=user.id).address
            webhooks.set_webhook(user.id, receiver.url(), "http://localhost")
            db.session.commit()
        daemon.start()
        for n in range(12):  # a new connection each: SO_REUSEPORT spreads them over both processes
            assert send_one(daemon.port, box, build_message(n, box, tag="procs"))[0] == 250
        with app.app_context():  # and one stored by another process altogether (pipe, IMAP...)
            mailhandler.deliver(build_message(12, box, tag="procs"), [box], "a@peer.test")
        got = receiver.wait_for(lambda rs: len({event_of(r)["message"]["subject"] for r in rs}) == 13)
        assert len({r.delivery for r in got}) == 13
        log = (tmp_path / "daemon.log").read_text()
        assert log.count("SMTP receiver on") == 2 and log.count("webhook sender started") == 1
    finally:
        daemon.stop()
        receiver.close()


def test_standalone_senders_share_the_outbox(app_factory, tmp_path):
    """No daemon: ``flask pipe`` stores, two ``flask webhooks run`` send side
    by side, and no event goes out twice."""
    count = 30
    app = app_factory({"webhooks": FAST})
    config = write_config(app, tmp_path / "config.json")
    receiver = Receiver()
    senders = []
    try:
        with app.app_context():
            user = User.create("standalone@example.org")
            db.session.flush()
            box = Mailbox.create("pipebox", Domain.by_name("example.com"), 3600, "user-api", user_id=user.id).address
            _hook, secret = webhooks.set_webhook(user.id, receiver.url(), "http://localhost")
            db.session.commit()
            for n in range(count - 1):
                mailhandler.deliver(build_message(n, box, tag="pipe"), [box], "a@peer.test")
        piped = subprocess.run([str(VENV_FLASK), "--app", "app", "pipe", "--to", box], cwd=ROOT,
                               input=build_message(count - 1, box, tag="pipe"), env=flask_env(config),
                               capture_output=True, timeout=60)
        assert piped.returncode == 0, piped.stderr
        senders = [subprocess.Popen([str(VENV_FLASK), "--app", "app", "webhooks", "run"], cwd=ROOT,
                                    env=flask_env(config), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                   for _ in range(2)]
        got = receiver.wait_for(lambda rs: len(rs) >= count)
        time.sleep(1)  # a double send, if any, would arrive now
        got = receiver.wait_for(lambda rs: True)
        assert {event_of(r)["message"]["subject"] for r in got} == {f"pipe message {n}" for n in range(count)}
        assert len(got) == count and len({r.delivery for r in got}) == count
        for one in got:
            check_signature(secret, one)
        for proc in senders:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    finally:
        receiver.close()
        for proc in senders:
            if proc.poll() is None:
                proc.kill()


def test_private_addresses_are_refused_over_http(app_factory, tmp_path):
    """``webhooks.allow_private`` false (the default), through gunicorn."""
    app = app_factory()
    web = Gunicorn(write_config(app, tmp_path / "config.json"), tmp_path / "gunicorn.log", workers=1).start()
    try:
        api = user_api(SimpleNamespace(app=app, web=web))
        for url in ("http://127.0.0.1:8080/hook", "http://10.0.0.8/", "http://169.254.169.254/latest/meta-data/",
                    "http://[::1]/", "http://localhost/hook", "https://0.0.0.0/"):
            resp = api.put(api.url("/api/webhook"), json={"url": url}, timeout=30)
            assert resp.status_code == 422, url
            assert "which is not a public address" in resp.json()["message"], url
        assert api.get(api.url("/api/webhook"), timeout=30).status_code == 404
        assert api.put(api.url("/api/webhook"), json={"url": "https://93.184.215.14/hook"}, timeout=30).ok
    finally:
        web.stop()
