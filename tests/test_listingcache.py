"""Listings answered from a worker's memory (listingcache.py) are never stale:
through gunicorn as ``make run`` serves it (2 gevent workers, each of which
has answered the listing before), with mail delivered by the real daemon, a
new, a read and a deleted message show on the very next request through
every worker, for api.php's inbox and the User API's listing alike (and a
message api.php has shown is gone from every worker once deleted)."""
from __future__ import annotations

import json
import smtplib
import time
from concurrent.futures import ThreadPoolExecutor
from email.message import EmailMessage
from pathlib import Path

import pytest
import requests

from adversarial.helpers import Daemon, Gunicorn
from listingcache import ListingCache
from sqlalchemy import select

from models import ApiKey, Message, User, db

ROOT = Path(__file__).resolve().parent.parent
BURST = 24


def test_cache_answers_only_the_same_fingerprint_and_stays_in_budget():
    kept = ListingCache(8_000)
    kept.put("a", ((1, "p1", False),), b"x" * 100)
    assert kept.get("a", ((1, "p1", False),)) == b"x" * 100
    assert kept.get("a", ((1, "p1", True),)) is None  # read since
    assert kept.get("a", ((1, "p1", False), (2, "p2", False))) is None  # new mail
    assert kept.get("a", ((1, "other", False),)) is None  # the id now names another message
    kept.put("big", (), b"x" * 1_500)  # more than an eighth of the budget: not kept
    assert kept.get("big", ()) is None
    for n in range(20):
        kept.put(n, (), b"x" * 500)
    assert len(kept) < 20 and kept.get(19, ()) == b"x" * 500 and kept.get(0, ()) is None


class Site:
    """The daemon and gunicorn (deploy/gunicorn.conf.py, 2 workers), with an
    access log that names the worker of every request."""

    def __init__(self, app, tmp: Path):
        self.app = app
        config = tmp / "config.json"
        config.write_text(json.dumps(dict(app.config["TEMPMAIL"], secret_key=app.config["SECRET_KEY"])))
        self.log = tmp / "gunicorn.log"
        self.daemon = Daemon(config, tmp / "smtpd.log").start()
        self.web = Gunicorn(config, self.log, workers=2, extra=[
            "--config", str(ROOT / "deploy" / "gunicorn.conf.py"),
            "--access-logformat", "served-by %(p)s %(s)s %(m)s %(U)s"]).start()
        self.url, self.sent = self.web.url, 0

    def workers(self) -> set[str]:
        children = Path(f"/proc/{self.web.proc.pid}/task/{self.web.proc.pid}/children").read_text()
        return {f"<{pid}>" for pid in children.split()}

    def send(self, to: str) -> None:
        """One message through the daemon; its 250 means stored and visible."""
        self.sent += 1
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "Sender <sender@peer.test>", to, f"cached {self.sent}"
        msg["Message-ID"] = f"<cache-{self.sent}-{time.time_ns()}@peer.test>"
        msg.set_content(f"body {self.sent}\n")
        with smtplib.SMTP("127.0.0.1", self.daemon.port, timeout=30) as smtp:
            assert smtp.sendmail("sender@peer.test", [to], msg.as_bytes()) == {}

    def burst(self, path: str, headers: dict | None = None, status: int = 200) -> list[dict]:
        """The listing fetched by BURST parallel requests on new connections,
        again until both workers have answered some (checked in the access
        log): every answer is returned."""
        answers: list[dict] = []
        for _ in range(10):
            start = self.log.stat().st_size
            with ThreadPoolExecutor(max_workers=BURST) as pool:
                answers += list(pool.map(lambda _n: self.get(path, headers, status), range(BURST)))
            time.sleep(0.2)  # the access log line is written after the answer
            with open(self.log) as log:
                log.seek(start)
                served = {line.split()[1] for line in log if line.startswith("served-by ")}
            if self.workers() <= served:
                return answers
        pytest.fail(f"the requests never reached both workers {self.workers()}: {served}")

    def get(self, path: str, headers: dict | None = None, status: int = 200) -> dict:
        resp = requests.get(self.url + path, headers={**(headers or {}), "Connection": "close"}, timeout=30)
        assert resp.status_code == status, resp.text
        return resp.json()

    def close(self) -> None:
        self.web.stop()
        self.daemon.stop()


@pytest.fixture
def site(app, tmp_path):
    running = Site(app, tmp_path)
    yield running
    running.close()


def test_api_php_inbox_is_never_stale_in_any_worker(site):
    address = requests.get(f"{site.url}/api.php/generate", timeout=30).json()["email"]
    for _ in range(3):
        site.send(address)
    path = f"/api.php/inbox/{address}"
    assert {a["total"] for a in site.burst(path)} == {3}  # every worker has kept this listing
    site.send(address)
    answers = site.burst(path)
    assert {a["total"] for a in answers} == {4}
    first, second = answers[0]["emails"][0]["id"], answers[0]["emails"][1]["id"]
    assert site.get(f"/api.php/email/{first}")["email"]["is_read"] == 1
    assert all([m["is_read"] for m in a["emails"]] == [1, 0, 0, 0] for a in site.burst(path))
    assert {a["email"]["subject"] for a in site.burst(f"/api.php/email/{second}")} == {"cached 2"}
    assert requests.delete(f"{site.url}/api.php/email/{second}", timeout=30).status_code == 200
    assert site.burst(f"/api.php/email/{second}", status=404)[0] == {"error": "Email not found"}
    answers = site.burst(path)
    assert all(a["total"] == 3 and second not in [m["id"] for m in a["emails"]] for a in answers)
    page = site.burst(path + "?limit=1&offset=1")  # a page carries the total of the whole inbox
    site.send(address)
    assert {a["total"] for a in page} == {3} and {a["total"] for a in site.burst(path + "?limit=1&offset=1")} == {4}


def test_user_api_listing_is_never_stale_in_any_worker(site, app):
    with app.app_context():
        _key, raw = ApiKey.issue(User.create("cached@users.test"))
        db.session.commit()
    auth = {"Authorization": f"Bearer {raw}"}
    address = requests.post(f"{site.url}/api/emails", headers=auth, timeout=30).json()["data"]["email"]
    for _ in range(3):
        site.send(address)
    path = f"/api/messages?email={address}"
    assert {len(a["messages"]) for a in site.burst(path, auth)} == {3}
    site.send(address)
    answers = site.burst(path, auth)
    assert {len(a["messages"]) for a in answers} == {4}
    newest, oldest = answers[0]["messages"][0]["id"], answers[0]["messages"][-1]["id"]
    assert site.get(f"/api/messages/{newest}", auth)["data"]["is_seen"] is True
    assert all([m["is_seen"] for m in a["messages"]] == [True, False, False, False]
               for a in site.burst(path, auth))
    assert requests.delete(f"{site.url}/api/messages/{oldest}", headers=auth, timeout=30).status_code == 200
    answers = site.burst(path, auth)
    assert all([m["id"] for m in a["messages"]][-1] != oldest and len(a["messages"]) == 3 for a in answers)


def test_api_php_inbox_answers_an_unchanged_poll_with_304(app, client):
    """``If-None-Match`` with the inbox's ETag: 304 without a body while
    nothing changed; a new message gives 200 with the new list and a new ETag."""
    import mailhandler
    from models import Mailbox
    address = client.get("/api.php/generate").get_json()["email"]
    first = client.get(f"/api.php/inbox/{address}")
    etag = first.headers["ETag"]
    again = client.get(f"/api.php/inbox/{address}", headers={"If-None-Match": etag})
    assert again.status_code == 304 and again.data == b"" and again.headers["ETag"] == etag
    assert "Content-Type" not in again.headers and again.headers.getlist("Date") == []
    with app.app_context():
        mailhandler.store_message(Mailbox.find_live(address), {
            "from_email": "a@peer.test", "from_name": "A", "subject": "new", "body_text": "x"},
            b"Subject: new\r\n\r\nx\r\n", [])
        db.session.commit()
    changed = client.get(f"/api.php/inbox/{address}", headers={"If-None-Match": etag})
    assert changed.status_code == 200 and changed.get_json()["total"] == 1 and changed.headers["ETag"] != etag
    unpaged_etag, paged = changed.headers["ETag"], client.get(f"/api.php/inbox/{address}?limit=1&offset=1")
    assert paged.headers["ETag"] != unpaged_etag  # another answer, another validator


def test_listings_without_the_cache(app_factory):
    """``listing_cache_bytes: 0``: nothing is kept, both listings answer as usual."""
    app = app_factory({"listing_cache_bytes": 0})
    client = app.test_client()
    assert "listing_cache" not in app.extensions
    address = client.get("/api.php/generate").get_json()["email"]
    first = client.get(f"/api.php/inbox/{address}")
    assert first.get_json()["total"] == 0
    assert client.get(f"/api.php/inbox/{address}", headers={"If-None-Match": first.headers["ETag"]}).status_code == 304
    with app.app_context():
        _key, raw = ApiKey.issue(User.create("nocache@users.test"))
        db.session.commit()
    auth = {"Authorization": f"Bearer {raw}"}
    owned = client.post("/api/emails", headers=auth).get_json()["data"]["email"]
    assert client.get(f"/api/messages?email={owned}", headers=auth).get_json()["messages"] == []


def test_a_reparsed_message_is_seen_by_every_worker(site, app):
    """``flask reparse`` rewrites a stored message's fields (here: back from
    what an older parser had stored) and bumps its revision: every worker's
    kept listing and message answer give way to the new fields."""
    address = requests.get(f"{site.url}/api.php/generate", timeout=30).json()["email"]
    site.send(address)
    with app.app_context():
        msg = db.session.scalars(select(Message).where(Message.envelope_to == address)).one()
        msg.subject = "as an older release parsed it"
        db.session.commit()
        msg_id, shown = msg.id, msg.legacy_id
    path = f"/api.php/inbox/{address}"
    assert {a["emails"][0]["subject"] for a in site.burst(path)} == {"as an older release parsed it"}
    assert {a["email"]["subject"] for a in site.burst(f"/api.php/email/{shown}")} == {
        "as an older release parsed it"}
    result = app.test_cli_runner().invoke(args=["reparse", "--id", str(msg_id)])
    assert result.exit_code == 0, result.output
    assert {a["emails"][0]["subject"] for a in site.burst(path)} == {f"cached {site.sent}"}
    assert {a["email"]["subject"] for a in site.burst(f"/api.php/email/{shown}")} == {f"cached {site.sent}"}
