"""Waiting for mail and live streams over real HTTP: gunicorn as ``make run``
serves it (deploy/gunicorn.conf.py, 2 workers) and the real mail daemon, in
separate processes, on SQLite and on PostgreSQL.

The daemon tells the web workers of new mail through the database's own
channel (PostgreSQL NOTIFY) or, on SQLite, a datagram to each worker's
socket; these tests see the effect from outside: a held request answers as
soon as the 250 is out. Latency is measured and printed (p50/p99 from the
250 to the answer); only a generous sanity bound is asserted.
"""
from __future__ import annotations

import http.client
import json
import select
import smtplib
import socket
import subprocess
import sys
import threading
import time
from email.message import EmailMessage
from urllib.parse import urlsplit

import pytest
import requests

import docs_content
from adversarial.helpers import Daemon, Gunicorn, record
from app import create_app
from conftest import BACKENDS, TEST_DOMAINS, dispose, wipe
from models import ApiKey, Mailbox, User, db

SANITY_S = 5.0  # a held request that answers this late did not hear of the mail at all
ALLOWED_ORIGIN = "https://app.example"
MESSAGE_KEYS = {"is_seen", "subject", "from", "from_email", "to", "receivedAt", "id", "html",
                "attachments"}


class Stack:
    """The daemon and gunicorn of one database, plus what the tests share."""

    def __init__(self, app, tmp, backend: str):
        self.app, self.backend = app, backend
        conf = dict(app.config["TEMPMAIL"], secret_key=app.config["SECRET_KEY"])
        self.tmp = tmp
        self.config = config = tmp / "config.json"
        config.write_text(json.dumps(conf))
        self.daemon = Daemon(config, tmp / "smtpd.log").start()
        self.web = Gunicorn(config, tmp / "gunicorn.log", workers=2,
                            extra=["--config", "deploy/gunicorn.conf.py"]).start()
        self.url = self.web.url
        self.smtp = smtplib.SMTP("127.0.0.1", self.daemon.port, timeout=30)
        self.smtp.ehlo("tests.example")
        self.sent = 0

    def send(self, to: str, subject: str = "", sender: str = "Sender <sender@peer.test>") -> float:
        """Deliver one message over the open SMTP session; returns the moment
        the 250 after DATA arrived (``time.perf_counter``)."""
        self.sent += 1
        msg = EmailMessage()
        msg["From"], msg["To"] = sender, to
        msg["Subject"] = subject or f"live message {self.sent}"
        msg["Message-ID"] = f"<live-{self.sent}-{time.time_ns()}@peer.test>"
        msg.set_content(f"body {self.sent}\n")
        refused = self.smtp.sendmail("sender@peer.test", [to], msg.as_bytes())
        assert refused == {}
        return time.perf_counter()

    def key(self, email: str) -> dict:
        """Authorization headers of a new User API key."""
        with self.app.app_context():
            _key, raw = ApiKey.issue(User.create(email))
            db.session.commit()
        return {"Authorization": f"Bearer {raw}"}

    def api_mailbox(self, auth: dict) -> str:
        resp = requests.post(f"{self.url}/api/emails", headers=auth, timeout=30)
        assert resp.status_code == 200, resp.text
        return resp.json()["data"]["email"]

    def legacy_mailbox(self) -> str:
        return requests.get(f"{self.url}/api.php/generate", timeout=30).json()["email"]

    def close(self) -> None:
        self.smtp.close()
        self.web.stop()
        self.daemon.stop()


@pytest.fixture(scope="module", params=BACKENDS)
def stack(request, tmp_path_factory):
    """One daemon and one gunicorn per database for the whole module."""
    tmp = tmp_path_factory.mktemp(f"live-{request.param}")
    url = (f"sqlite:///{tmp}/tempmail.db" if request.param == "sqlite"
           else request.getfixturevalue("pg_test_url"))
    live = {"heartbeat_seconds": 0.5}
    if request.param == "postgresql":  # the LISTEN connection by a URL of its own (as past PgBouncer)
        live["listen_url"] = url.replace("postgresql+psycopg://", "postgres://")
    app = create_app({"TESTING": True, "TEMPMAIL": {
        "database_url": url, "uploads_dir": str(tmp / "uploads"), "domains": TEST_DOMAINS,
        "cors_origins": [ALLOWED_ORIGIN], "live": live}})
    if request.param == "postgresql":
        wipe(app)
    running = Stack(app, tmp, request.param)
    yield running
    running.close()
    dispose([app])


# --------------------------------------------------------------------------
# helpers

class Held:
    """A request sent in a thread (a long poll), with the moment its answer
    was complete."""

    def __init__(self, url: str, headers: dict | None = None):
        self.url, self.headers = url, headers or {}
        self.resp: requests.Response | None = None
        self.done_at = 0.0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        self.resp = requests.get(self.url, headers=self.headers, timeout=90)
        self.done_at = time.perf_counter()

    def result(self) -> requests.Response:
        self.thread.join(90)
        assert self.resp is not None, f"no answer from {self.url}"
        return self.resp


def settle() -> None:
    """Give a just-sent held request time to reach the server and start
    waiting, so the mail sent next arrives while it waits (not before)."""
    time.sleep(0.15)


class EventStream:
    """A Server-Sent Events reader on a plain HTTP connection: ``next()``
    returns the next event as a dict (``comment`` for comment lines)."""

    def __init__(self, url: str, headers: dict):
        parts = urlsplit(url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        self.conn.request("GET", parts.path + ("?" + parts.query if parts.query else ""), headers=headers)
        self.resp = self.conn.getresponse()
        self.status = self.resp.status

    def next(self) -> dict:
        event: dict = {}
        while True:
            line = self.resp.readline().decode("utf-8")
            assert line, "the stream ended"
            line = line.rstrip("\n")
            if line == "":
                if event:
                    return event
                continue
            field, _, value = line.partition(":")
            if field == "":
                return {"comment": value.strip()}
            event[field] = value[1:] if value.startswith(" ") else value

    def next_or_end(self) -> dict:
        """The next event, or {} once the server ended the stream."""
        try:
            return self.next()
        except AssertionError:
            return {}

    def next_message(self) -> dict:
        """The next ``message`` event (skipping heartbeats), data decoded."""
        while True:
            event = self.next()
            if event.get("event") == "message":
                return dict(event, data=json.loads(event["data"]))

    def close(self) -> None:
        self.conn.close()


def percentiles(values: list[float]) -> str:
    ordered = sorted(values)
    pick = lambda p: ordered[min(len(ordered) - 1, max(0, -(-p * len(ordered) // 100) - 1))]
    return f"p50 {pick(50) * 1000:.1f} ms, p99 {pick(99) * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms"


# --------------------------------------------------------------------------
# waiting (long poll)

def wait_rounds(stack, boxes: list[str], rounds: int, url_for, newest, auth=None) -> list[float]:
    """``rounds`` times: one long poll per mailbox, then one message to each,
    sent at once over parallel SMTP connections (so the daemon commits them
    together, as under load). Returns each message's 250 -> answer time."""
    since = {box: "" for box in boxes}
    latencies = []
    for n in range(rounds):
        held = {box: Held(url_for(box, since[box]), auth) for box in boxes}
        settle()
        acked = parallel_send(stack, {box: f"arrival {n}" for box in boxes})
        for box in boxes:
            resp = held[box].result()
            assert resp.status_code == 200, resp.text
            since[box] = newest(resp.json(), f"arrival {n}")
            latencies.append(held[box].done_at - acked[box])
    return latencies


def parallel_send(stack, subjects: dict) -> dict:
    """One message per mailbox, each on its own SMTP connection, all at
    once; returns when each 250 arrived."""
    acked = {}

    def one(box: str) -> None:
        with smtplib.SMTP("127.0.0.1", stack.daemon.port, timeout=30) as conn:
            msg = EmailMessage()
            msg["From"], msg["To"], msg["Subject"] = "Sender <sender@peer.test>", box, subjects[box]
            msg["Message-ID"] = f"<live-{time.time_ns()}-{box}>"
            msg.set_content("body\n")
            assert conn.sendmail("sender@peer.test", [box], msg.as_bytes()) == {}
            acked[box] = time.perf_counter()
    threads = [threading.Thread(target=one, args=(box,)) for box in subjects]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return acked


def test_wait_answers_when_mail_arrives(stack):
    """50 long polls on api.php (5 mailboxes x 10 rounds), each answered by
    the message sent while it waits; 20 on the User API. The figure is the
    time from the 250 to the complete answer."""
    def legacy_newest(body: dict, subject: str) -> str:
        assert body["success"] is True and body["emails"][-1]["subject"] == subject
        return body["emails"][-1]["id"]

    boxes = [stack.legacy_mailbox() for _ in range(5)]
    latencies = wait_rounds(stack, boxes, 10, lambda box, since:
                            f"{stack.url}/api.php/inbox/{box}?wait=30&since={since}", legacy_newest)
    record("live", f"{stack.backend}: api.php ?wait= 250->answer, 50 messages: {percentiles(latencies)} (below 0: the answer beat the 250 to the sender)")
    assert max(latencies) < SANITY_S

    def user_newest(body: dict, subject: str) -> str:
        assert body["messages"][0]["subject"] == subject
        return body["messages"][0]["id"]

    auth = stack.key("waiter@example.org")
    boxes = [stack.api_mailbox(auth) for _ in range(5)]
    latencies = wait_rounds(stack, boxes, 4, lambda box, since:
                            f"{stack.url}/api/messages?email={box}&wait=30&since={since}", user_newest, auth)
    record("live", f"{stack.backend}: User API ?wait= 250->answer, 20 messages: {percentiles(latencies)}")
    assert max(latencies) < SANITY_S


def test_wait_times_out_or_answers_at_once(stack):
    address = stack.legacy_mailbox()
    started = time.monotonic()
    empty = requests.get(f"{stack.url}/api.php/inbox/{address}?wait=1", timeout=30)
    waited = time.monotonic() - started
    assert empty.status_code == 200 and empty.json()["emails"] == [] and empty.json()["total"] == 0
    assert waited >= 0.9  # it held the request for the whole second

    stack.send(address, "already here")
    started = time.monotonic()
    body = requests.get(f"{stack.url}/inbox/{address}?wait=30", timeout=60).json()  # without /api.php too
    assert time.monotonic() - started < SANITY_S  # not the 30 s: the message was there
    assert [e["subject"] for e in body["emails"]] == ["already here"]
    newest = body["emails"][-1]["id"]
    # since the newest: nothing newer, so the full second again, then the same list
    again = requests.get(f"{stack.url}/api.php/inbox/{address}?wait=1&since={newest}", timeout=30)
    assert again.status_code == 200 and again.json() == body
    # since=0 means "any message": at once
    assert requests.get(f"{stack.url}/api.php/inbox/{address}?wait=30&since=0", timeout=60).json()["total"] == 1


def test_bad_wait_values_in_each_apis_shape(stack):
    address = stack.legacy_mailbox()
    for query in ("wait=61", "wait=-1", "wait=abc", "wait=1.5", "wait=" + "9" * 40, "since=abc", "since=-4",
                  "since=" + "9" * 30):
        resp = requests.get(f"{stack.url}/api.php/inbox/{address}?{query}", timeout=30)
        assert resp.status_code == 400, query
        assert resp.json()["success"] is False and resp.json()["error"].startswith("Invalid "), query
    auth = stack.key("badvalues@example.org")
    box = stack.api_mailbox(auth)
    for query in ("wait=61", "wait=x", "since=" + "A" * 46, "since=short", "from=" + "x" * 201, "tag=" + "t" * 65):
        resp = requests.get(f"{stack.url}/api/messages?email={box}&{query}", headers=auth, timeout=30)
        assert resp.status_code == 422, query
        assert resp.json()["status"] is False and resp.json()["message"].startswith("Invalid "), query


def test_filters_and_tags_select_what_is_listed_and_awaited(stack):
    auth = stack.key("filters@example.org")
    box = stack.api_mailbox(auth)
    name, domain = box.split("@")
    stack.send(box, "Welcome aboard", "Alice <alice@shop.test>")
    stack.send(box, "Your CODE is 4821", "Bob Builder <bob@bank.test>")
    stack.send(f"{name}+signup@{domain}", "Verify your address", "Carol <carol@app.test>")

    def subjects(query: str) -> list[str]:
        resp = requests.get(f"{stack.url}/api/messages?email={box}&{query}", headers=auth, timeout=30)
        assert resp.status_code == 200, resp.text
        return [m["subject"] for m in resp.json()["messages"]]

    assert subjects("from=BOB") == ["Your CODE is 4821"]           # display name or address
    assert subjects("from=alice%40shop") == ["Welcome aboard"]
    assert subjects("subject=code") == ["Your CODE is 4821"]        # case-insensitive
    assert subjects("tag=signup") == subjects("tag=SIGNUP") == ["Verify your address"]
    assert subjects("from=nobody") == [] and len(subjects("")) == 3

    # a wait with a filter ignores mail that does not pass it
    held = Held(f"{stack.url}/api/messages?email={box}&wait=30&subject=reset", auth)
    settle()
    stack.send(box, "Newsletter")
    stack.send(box, "Password RESET link")
    assert [m["subject"] for m in held.result().json()["messages"]] == ["Password RESET link"]
    # ... and a wait for a tag answers only to mail for that tag
    held = Held(f"{stack.url}/api/messages?email={box}&wait=30&tag=t2", auth)
    settle()
    stack.send(f"{name}+t1@{domain}", "for t1")
    stack.send(f"{name}+t2@{domain}", "for t2")
    assert [m["subject"] for m in held.result().json()["messages"]] == ["for t2"]

    # api.php keeps its shape: a tagged message simply appears in the inbox
    legacy = stack.legacy_mailbox()
    lname, ldomain = legacy.split("@")
    stack.send(f"{lname}+news@{ldomain}", "tagged for api.php")
    emails = requests.get(f"{stack.url}/api.php/inbox/{legacy}", timeout=30).json()["emails"]
    assert [e["subject"] for e in emails] == ["tagged for api.php"]
    assert set(emails[0]) == {"id", "from_email", "from_name", "subject", "is_read", "received_at"}


def test_codes_are_extracted_over_gunicorn(stack):
    """The test-automation loop end to end: wait for the mail, then take its code."""
    auth = stack.key("extract@example.org")
    box = stack.api_mailbox(auth)
    held = Held(f"{stack.url}/api/messages?email={box}&wait=30", auth)
    settle()
    stack.send(box, "Your verification code is 739204", "App <no-reply@app.test>")
    (msg,) = held.result().json()["messages"]
    resp = requests.get(f"{stack.url}/api/messages/{msg['id']}/extract", headers=auth, timeout=30)
    assert resp.status_code == 200, resp.text
    assert resp.json()["data"]["codes"][0] == "739204" and resp.json()["data"]["links"] == []
    other = stack.key("someone-else@example.org")
    assert requests.get(f"{stack.url}/api/messages/{msg['id']}/extract", headers=other,
                        timeout=30).status_code == 404


def test_an_ended_wait_counts_toward_the_quota(stack):
    auth = stack.key("quota@example.org")
    box = stack.api_mailbox(auth)
    used = lambda resp: int(resp.headers["X-RateLimit-Used"])
    before = used(requests.get(f"{stack.url}/api/domains", headers=auth, timeout=30))
    timed_out = requests.get(f"{stack.url}/api/messages?email={box}&wait=1", headers=auth, timeout=30)
    assert timed_out.status_code == 200 and timed_out.json()["messages"] == []
    assert used(timed_out) == before + 1
    refused = requests.get(f"{stack.url}/api/messages?email={box}&wait=99", headers=auth, timeout=30)
    assert refused.status_code == 422 and used(refused) == before + 1  # a 4xx is not counted


# --------------------------------------------------------------------------
# streams

def test_stream_delivers_each_message_and_resumes_with_last_event_id(stack):
    auth = stack.key("stream@example.org")
    box = stack.api_mailbox(auth)
    stream = EventStream(f"{stack.url}/api/messages/stream?email={box}", auth)
    assert stream.status == 200 and stream.resp.getheader("Content-Type").startswith("text/event-stream")
    assert int(stream.resp.getheader("X-RateLimit-Used")) >= 1  # one unit for the stream opened
    assert stream.next() == {"comment": "connected"}
    latencies, seen = [], []
    for n in range(20):
        acked = stack.send(box, f"streamed {n}")
        event = stream.next_message()
        latencies.append(time.perf_counter() - acked)
        assert event["data"]["subject"] == f"streamed {n}" and event["id"] == event["data"]["id"]
        assert set(event["data"]) == MESSAGE_KEYS and event["data"]["is_seen"] is False
        seen.append(event["id"])
    record("live", f"{stack.backend}: stream 250->event over 20 messages: {percentiles(latencies)}")
    assert max(latencies) < SANITY_S
    # the object is GET /api/messages/{id} less its body
    full = requests.get(f"{stack.url}/api/messages/{seen[-1]}", headers=auth, timeout=30).json()["data"]
    assert {k: v for k, v in full.items() if k not in ("content", "is_seen")} == \
        {k: v for k, v in event["data"].items() if k != "is_seen"}
    # heartbeats while nothing happens (0.5 s in this configuration)
    assert stream.next() == {"comment": "heartbeat"}
    stream.close()

    missed = [stack.send(box, f"while away {n}") for n in range(3)]
    assert len(missed) == 3
    resumed = EventStream(f"{stack.url}/api/messages/stream?email={box}", dict(auth, **{"Last-Event-ID": seen[-1]}))
    assert [resumed.next_message()["data"]["subject"] for _ in range(3)] == [f"while away {n}" for n in range(3)]
    stack.send(box, "after resuming")
    assert resumed.next_message()["data"]["subject"] == "after resuming"
    resumed.close()


def test_stream_filters_and_ends_when_the_mailbox_goes(stack):
    auth = stack.key("streamfilter@example.org")
    box = stack.api_mailbox(auth)
    name, domain = box.split("@")
    stream = EventStream(f"{stack.url}/api/messages/stream?email={box}&tag=only", auth)
    stack.send(box, "untagged")
    stack.send(f"{name}+only@{domain}", "tagged")
    assert stream.next_message()["data"]["subject"] == "tagged"
    assert requests.delete(f"{stack.url}/api/emails/{box}", headers=auth, timeout=30).status_code == 200
    while (event := stream.next()).get("event") != "gone":
        assert "comment" in event
    assert stream.resp.read() == b""  # and the response ends
    stream.close()
    head = requests.head(f"{stack.url}/api/messages/stream?email={box}&tag=only", headers=auth, timeout=30)
    assert head.status_code == 404  # checked like a GET, answered at once
    gone = requests.get(f"{stack.url}/api/messages/stream?email={box}", headers=auth, timeout=30)
    assert gone.status_code == 404 and gone.json() == {"status": False, "message": "Email not found."}


def test_stream_origin_is_checked(stack):
    auth = stack.key("origin@example.org")
    box = stack.api_mailbox(auth)
    url = f"{stack.url}/api/messages/stream?email={box}"
    refused = requests.get(url, headers=dict(auth, Origin="https://evil.example"), timeout=30)
    assert refused.status_code == 403 and refused.json()["status"] is False
    assert "Access-Control-Allow-Origin" not in refused.headers
    head = requests.head(url, headers=auth, timeout=30)  # at once, not held for the stream's hour
    assert head.status_code == 200 and head.headers["Content-Type"].startswith("text/event-stream")
    for origin in (ALLOWED_ORIGIN, stack.url, None):
        headers = dict(auth, Origin=origin) if origin else auth
        allowed = EventStream(url, headers)
        assert allowed.status == 200, origin
        allowed.close()

    # the page's own stream: the session's mailbox, the page's origin only
    browser = requests.Session()
    assert browser.get(stack.url + "/", timeout=30).status_code == 200
    page_stream = f"{stack.url}/web/stream"
    for headers in ({"Origin": "https://evil.example"}, {"Origin": ALLOWED_ORIGIN},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}, {"Origin": "null"}):
        assert browser.get(page_stream, headers=headers, timeout=30).status_code == 403, headers
    own = EventStream(page_stream, {"Cookie": "; ".join(f"{c.name}={c.value}" for c in browser.cookies),
                                    "Origin": stack.url, "Sec-Fetch-Site": "same-origin"})
    assert own.status == 200
    own.close()
    assert requests.get(page_stream, timeout=30).status_code == 404  # no session, no mailbox


def test_page_stream_sends_rows_pings_and_resumes(stack):
    browser = requests.Session()
    page = browser.get(stack.url + "/", timeout=30).text
    address = page.split('id="address"', 1)[1].split('value="', 1)[1].split('"', 1)[0]
    cookie = "; ".join(f"{c.name}={c.value}" for c in browser.cookies)
    stream = EventStream(f"{stack.url}/web/stream?after=0", {"Cookie": cookie})
    stack.send(address, "to the page")
    event = stream.next_message()
    assert event["data"]["subject"] == "to the page" and event["id"] == str(event["data"]["id"])
    assert event["data"]["url"] == f"/web/messages/{event['id']}"
    while (ping := stream.next()).get("event") != "ping":
        pass
    assert 0 < json.loads(ping["data"])["expires_in"] <= 86400
    stream.close()
    stack.send(address, "missed by the page")
    resumed = EventStream(f"{stack.url}/web/stream", {"Cookie": cookie, "Last-Event-ID": event["id"]})
    assert resumed.next_message()["data"]["subject"] == "missed by the page"
    resumed.close()
    # the read-only page of an email_token has its stream too, without a session
    with stack.app.app_context():
        token = Mailbox.find_live(address).email_token()
    by_token = EventStream(f"{stack.url}/m/{token}/stream?after={event['id']}", {})
    message = by_token.next_message()["data"]
    assert message["subject"] == "missed by the page" and message["url"].startswith(f"/m/{token}/messages/")
    by_token.close()
    assert requests.get(f"{stack.url}/m/{token[:-2]}xx/stream", timeout=30).status_code == 404


def test_the_docs_python_stream_sample_works(stack):
    """/docs's Python sample for the stream, run as a reader would paste it."""
    auth = stack.key("sample@example.org")
    box = stack.api_mailbox(auth)
    code = dict((sid, text) for sid, _label, text in docs_content.stream_samples(
        f"{stack.url}/api/messages/stream?email={box}"))["python"]
    code = code.replace(docs_content.KEY, auth["Authorization"].split()[1])
    reader = subprocess.Popen([sys.executable, "-u", "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and reader.poll() is None:
            stack.send(box, "for the sample")
            ready, _, _ = select.select([reader.stdout], [], [], 1.0)
            if ready:
                break
        assert "'subject': 'for the sample'" in reader.stdout.readline()
    finally:
        reader.kill()
        reader.wait(10)


def test_a_burst_of_held_requests_on_a_fresh_worker(stack):
    """80 long polls and streams at once on a worker that has not listened
    yet, far more than its pool of 15 connections: all are answered. (The
    pool deadlock this guards against needs a larger burst to show reliably;
    tests/test_mailevents.py checks its cause directly.)"""
    web = Gunicorn(stack.config, stack.tmp / "burst.log", workers=1,
                   extra=["--config", "deploy/gunicorn.conf.py"]).start()
    auth = stack.key("burst@example.org")
    boxes = [stack.legacy_mailbox() for _ in range(4)]
    api_box = stack.api_mailbox(auth)
    try:
        # Connected first, then every request written at once: they reach
        # the worker together, as after a restart with clients waiting.
        socks = [socket.create_connection(("127.0.0.1", web.port), timeout=60) for _ in range(60)]
        for n, sock in enumerate(socks):
            sock.sendall(f"GET /api.php/inbox/{boxes[n % 4]}?wait=3 HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        streams = [EventStream(f"{web.url}/api/messages/stream?email={api_box}", auth) for _ in range(20)]
        assert [s.status for s in streams] == [200] * 20
        assert [sock.makefile("rb").readline().split()[1] for sock in socks] == [b"200"] * 60
        for sock in socks:
            sock.close()
        stack.send(api_box, "to every stream")
        assert {s.next_message()["data"]["subject"] for s in streams} == {"to every stream"}
        for stream in streams:
            stream.close()
    finally:
        web.stop()


def test_a_stopping_worker_ends_its_held_requests_at_once(stack):
    """SIGTERM (a stop, or the old workers of a reload): the long poll answers
    with what there is and the stream closes, instead of both holding the
    shutdown for gunicorn's 30 s graceful timeout."""
    web = Gunicorn(stack.config, stack.tmp / "stopping.log", workers=1,
                   extra=["--config", "deploy/gunicorn.conf.py"]).start()
    address = stack.legacy_mailbox()
    auth = stack.key("stopping@example.org")
    stream = EventStream(f"{web.url}/api/messages/stream?email={stack.api_mailbox(auth)}", auth)
    assert stream.next() == {"comment": "connected"}
    held = Held(f"{web.url}/api.php/inbox/{address}?wait=60")
    settle()
    started = time.monotonic()
    web.stop()
    assert held.result().status_code == 200 and held.resp.json()["emails"] == []
    while "comment" in (event := stream.next_or_end()):
        pass
    assert event == {}  # the stream ended
    assert time.monotonic() - started < 15  # not the 30 s graceful timeout, nor the 60 s wait
    stream.close()


def test_every_worker_listened_for_new_mail(stack):
    """The figures above would hold even with a degraded listener (waiters
    then look every second); the logs say whether each worker's listener ran."""
    log = (stack.tmp / "gunicorn.log").read_text(errors="replace")
    assert "cannot LISTEN" not in log and "no new-mail events" not in log and "listener lost" not in log
    assert "Traceback" not in log


@pytest.fixture(scope="module", autouse=True)
def figures(request):
    """Print this module's figures at its end, also outside the adversarial
    run (whose end-of-run summary shows them as well)."""
    yield
    from adversarial.helpers import SUMMARY
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not SUMMARY.get("live"):
        return
    with capture.global_and_fixture_disabled():
        reporter.write_line("")
        for line in SUMMARY["live"]:
            reporter.write_line(f"[live] {line}")
