"""Answers sent again below Flask (hotpath.py).

- A kept answer is Flask's answer: same status, headers and body (the User
  API's quota headers are per request: the count still moves by one).
- It is sent only while nothing it shows changed: new, read, deleted and
  reparsed messages, an expired or deleted mailbox, a revoked key, a spent
  quota all go back through Flask, which answers as always.
- It never crosses an owner: api.php never sends a User API mailbox's
  answer, and one key never gets another user's listing.
- Requests Flask must see (cookies, conditional requests, other query
  strings, other methods) are never answered from memory.

Through gunicorn with mail from the real daemon: tests/test_listingcache.py
(its bursts reach both workers' kept answers) and tests/test_quota_batch.py
(the quota stays exact when hot answers reserve it).
"""
from __future__ import annotations

from email.message import EmailMessage

import pytest
from werkzeug.test import Client

import limits
import mailhandler
from models import ApiKey, Mailbox, Message, QuotaUsage, User, db

QUOTA_COUNTS = {"X-RateLimit-Used", "X-RateLimit-Remaining"}


def deliver(app, address: str, subject: str, attachment: bytes | None = None) -> None:
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "Sender <sender@peer.test>", address, subject
    msg.set_content(f"{subject} body\n")
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="octet-stream", filename="a.bin")
    with app.app_context():
        assert mailhandler.deliver(msg.as_bytes(), [address], "sender@peer.test", "test")


def hits(app) -> int:
    return app.wsgi_app.hits


def flask_answer(app, path: str, headers: dict | None = None):
    """The same request answered by Flask itself, below the hot path."""
    return Client(app.wsgi_app.inner, app.response_class).get(path, headers=headers or {})


def same_answer(hot, cold, per_request=()) -> None:
    assert hot.status_code == cold.status_code == 200
    assert hot.data == cold.data
    strip = lambda resp: sorted((k, v) for k, v in resp.headers.items() if k not in per_request)  # noqa: E731
    assert strip(hot) == strip(cold)


@pytest.fixture
def user_key(app):
    with app.app_context():
        user = User.create("hot@users.test")
        _key, raw = ApiKey.issue(user)
        db.session.commit()
        return user.id, {"Authorization": f"Bearer {raw}"}


def test_api_php_answers_from_memory_are_flasks(app, client):
    address = client.get("/api.php/generate").get_json()["email"]
    deliver(app, address, "one")
    deliver(app, address, "two", attachment=b"\x00" * 300)
    shown = client.get(f"/api.php/inbox/{address}").get_json()["emails"][1]["id"]
    client.get(f"/api.php/email/{shown}")  # read: from now on it may be sent again
    for path in (f"/api.php/inbox/{address}", f"/inbox/{address}", f"/api.php/email/{shown}", f"/email/{shown}"):
        client.get(path)  # Flask answers and the answer is kept
        before = hits(app)
        hot = client.get(path)
        assert hits(app) == before + 1, path
        same_answer(hot, flask_answer(app, path))


def test_user_api_listing_from_memory_is_flasks_and_still_counted(app, client, user_key):
    user_id, auth = user_key
    address = client.post("/api/emails", headers=auth).get_json()["data"]["email"]
    deliver(app, address, "one", attachment=b"\x01" * 500)
    path = f"/api/messages?email={address}"
    first = client.get(path, headers=auth)
    before = hits(app)
    hot = client.get(path, headers=auth)
    assert hits(app) == before + 1
    assert int(hot.headers["X-RateLimit-Used"]) == int(first.headers["X-RateLimit-Used"]) + 1
    cold = flask_answer(app, path, auth)
    same_answer(hot, cold, per_request=QUOTA_COUNTS)
    assert int(cold.headers["X-RateLimit-Used"]) == int(hot.headers["X-RateLimit-Used"]) + 1
    with app.app_context():
        assert QuotaUsage.used_in(user_id, limits.quota_period()) == int(cold.headers["X-RateLimit-Used"])


def test_a_months_first_unit_answered_from_memory_starts_its_count(app, client, user_key):
    """The month's row is made on the hot path's own connection, not the session's."""
    user_id, auth = user_key
    address = client.post("/api/emails", headers=auth).get_json()["data"]["email"]
    path = f"/api/messages?email={address}"
    warm(app, client, path, auth)
    with app.app_context():  # as at a new month's start: no row yet
        QuotaUsage.query.filter_by(user_id=user_id).delete()
        db.session.commit()
    before = hits(app)
    hot = client.get(path, headers=auth)
    assert hits(app) == before + 1 and hot.headers["X-RateLimit-Used"] == "1"
    with app.app_context():
        assert QuotaUsage.used_in(user_id, limits.quota_period()) == 1


def warm(app, client, path: str, headers: dict | None = None):
    """Ask until the answer comes from memory; that answer."""
    client.get(path, headers=headers or {})
    before = hits(app)
    resp = client.get(path, headers=headers or {})
    assert hits(app) == before + 1, path
    return resp


def test_api_php_never_sends_what_changed(app, client, clock):
    address = client.get("/api.php/generate").get_json()["email"]
    deliver(app, address, "one")
    inbox = f"/api.php/inbox/{address}"
    assert warm(app, client, inbox).get_json()["total"] == 1
    deliver(app, address, "two")
    listed = client.get(inbox).get_json()
    assert [m["subject"] for m in listed["emails"]] == ["one", "two"]
    first, second = listed["emails"][0]["id"], listed["emails"][1]["id"]
    before = hits(app)
    assert client.get(f"/api.php/email/{first}").get_json()["email"]["is_read"] == 1
    assert hits(app) == before  # an unread message goes through Flask, which marks it read
    assert [m["is_read"] for m in warm(app, client, inbox).get_json()["emails"]] == [1, 0]
    warm(app, client, f"/api.php/email/{first}")
    with app.app_context():  # flask reparse: new fields, a new revision
        msg = db.session.get(Message, Message.by_legacy_id(str(first)).id)
        msg.subject, msg.revision = "reparsed", msg.revision + 1
        db.session.commit()
    assert client.get(f"/api.php/email/{first}").get_json()["email"]["subject"] == "reparsed"
    assert client.get(inbox).get_json()["emails"][0]["subject"] == "reparsed"
    assert client.delete(f"/api.php/email/{first}").status_code == 200
    assert client.get(f"/api.php/email/{first}").status_code == 404
    assert [m["id"] for m in client.get(inbox).get_json()["emails"]] == [second]
    warm(app, client, inbox)
    clock.advance(2 * 86400)  # past the mailbox's life
    gone = client.get(inbox)
    assert gone.status_code == 404 and gone.get_json()["error"] == "Email not found"


def test_user_api_never_sends_what_changed(app, client, user_key):
    user_id, auth = user_key
    address = client.post("/api/emails", headers=auth).get_json()["data"]["email"]
    deliver(app, address, "one")
    path = f"/api/messages?email={address}"
    assert len(warm(app, client, path, auth).get_json()["messages"]) == 1
    deliver(app, address, "two")
    assert [m["subject"] for m in client.get(path, headers=auth).get_json()["messages"]] == ["two", "one"]
    warm(app, client, path, auth)
    with app.app_context():  # 2 units left, then none
        QuotaUsage.query.filter_by(user_id=user_id).update({"used": limits.plan_quota("free") - 2})
        db.session.commit()
    assert warm(app, client, path, auth).status_code == 200
    spent = client.get(path, headers=auth)
    assert spent.status_code == 429 and spent.get_json()["status"] is False
    with app.app_context():
        assert QuotaUsage.used_in(user_id, limits.quota_period()) == limits.plan_quota("free")
        QuotaUsage.query.filter_by(user_id=user_id).update({"used": 0})
        db.session.commit()
    warm(app, client, path, auth)
    with app.app_context():
        ApiKey.query.filter_by(user_id=user_id).one().revoke()
        db.session.commit()
    assert client.get(path, headers=auth).status_code == 401


def test_a_deleted_user_api_mailbox_is_gone_at_once(app, client, user_key):
    _user_id, auth = user_key
    address = client.post("/api/emails", headers=auth).get_json()["data"]["email"]
    path = f"/api/messages?email={address}"
    warm(app, client, path, auth)
    assert client.delete(f"/api/emails/{address}", headers=auth).status_code == 200
    assert client.get(path, headers=auth).status_code == 404


def test_no_answer_crosses_an_owner(app, client, user_key):
    _user_id, auth = user_key
    owned = client.post("/api/emails", headers=auth).get_json()["data"]["email"]
    deliver(app, owned, "private")
    warm(app, client, f"/api/messages?email={owned}", auth)
    with app.app_context():
        _key, other = ApiKey.issue(User.create("other@users.test"))
        db.session.commit()
    before = hits(app)
    refused = client.get(f"/api/messages?email={owned}", headers={"Authorization": f"Bearer {other}"})
    assert refused.status_code == 404 and "private" not in refused.get_data(as_text=True)
    for path in (f"/api.php/inbox/{owned}", f"/inbox/{owned}"):  # api.php never shows a User API mailbox
        assert client.get(path).status_code == 404 and client.get(path).status_code == 404
    with app.app_context():
        shown = Message.query.join(Mailbox).filter(Mailbox.address == owned).one().legacy_id
    for _ in range(2):
        assert client.get(f"/api.php/email/{shown}").status_code == 404
    assert hits(app) == before


@pytest.mark.parametrize("variant", ["cookie", "etag", "query", "percent", "head", "lang", "no-key"])
def test_requests_flask_must_see_are_never_answered_from_memory(app, client, variant):
    address = client.get("/api.php/generate").get_json()["email"]
    deliver(app, address, "one")
    path = f"/api.php/inbox/{address}"
    etag = warm(app, client, path).headers["ETag"]
    headers, method = {}, client.get
    if variant == "cookie":
        client.set_cookie("session", "x")  # the test client's jar replaces a Cookie header
    elif variant == "etag":
        headers["If-None-Match"] = etag
    elif variant == "query":
        path += "?limit=1"
    elif variant == "percent":
        path = path.replace("@", "%2540")  # encoded twice: Flask's route decodes it
    elif variant == "head":
        method = client.head
    elif variant == "lang":
        path += "?lang=it"
    else:
        path = f"/api/messages?email={address}"
    before = hits(app)
    resp = method(path, headers=headers)
    assert hits(app) == before
    expected = {"etag": 304, "no-key": 401}.get(variant, 200)
    assert resp.status_code == expected, (variant, resp.data[:200])


def test_nothing_is_kept_without_the_cache(app_factory):
    app = app_factory({"listing_cache_bytes": 0})
    client = app.test_client()
    address = client.get("/api.php/generate").get_json()["email"]
    for _ in range(3):
        assert client.get(f"/api.php/inbox/{address}").status_code == 200
    assert hits(app) == 0
