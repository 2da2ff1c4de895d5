"""API 2, the Bearer-key User API: every route and error, compared with seed 000,
plus ownership, quota counting and the key commands of the CLI."""
from __future__ import annotations

from datetime import datetime
from urllib.parse import quote

from pathlib import Path

import pytest

import models
from conftest import ROOT
from models import ApiKey, Mailbox, Message, QuotaUsage, User, db
from seeds import examples
from shapes import assert_same_shape
import api_v1  # noqa: E402
import limits  # noqa: E402
import mailhandler  # noqa: E402

SEED = examples("000")
(DOMAINS, CREATED, SWITCHED, MAILBOX_DELETED, MESSAGES, MESSAGE, MESSAGE_DELETED) = SEED
QUOTA_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Used", "X-RateLimit-Remaining",
                 "X-RateLimit-Reset")


def test_seed_has_every_example():
    assert len(SEED) == 7


def make_user(app, email="dev@example.org", plan="free") -> str:
    """A user with a fresh key; returns the raw key."""
    with app.app_context():
        user = User.create(email, plan=plan)
        _key, raw = ApiKey.issue(user)
        db.session.commit()
        return raw


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}", "Accept": "application/json"}


class Api:
    """A test client bound to one API key."""

    def __init__(self, client, key):
        self.client, self.key = client, key

    def __getattr__(self, method):
        def call(path, **kwargs):
            headers = {**bearer(self.key), **kwargs.pop("headers", {})}
            return getattr(self.client, method)(path, headers=headers, **kwargs)
        return call


@pytest.fixture
def api(app, client):
    return Api(client, make_user(app))


@pytest.fixture
def other(app, client):
    """A second user, for cross-user attempts."""
    return Api(client, make_user(app, "intruder@example.org"))


def deliver(app, address, html="<p>Hello from the inbox.</p>", text="Hello from the inbox.",
            attachments=({"filename": "file.txt", "data": b"x" * 91, "content_type": "text/plain"},)):
    """Store a message the way the receiver does; returns its public id."""
    with app.app_context():
        box = Mailbox.find_live(address)
        msg = mailhandler.store_message(box, {
            "from_email": "hello@example.org", "from_name": "Example Sender",
            "subject": "Welcome to Temp Mail", "body_text": text, "body_html": html,
            "envelope_to": address, "to": address}, b"Subject: x\r\n\r\nbody\r\n", attachments)
        db.session.commit()
        return msg.public_id


def new_mailbox(api) -> str:
    resp = api.post("/api/emails")
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()["data"]["email"]


def uploads_files(app) -> list:
    return sorted(p.name for p in Path(app.config["UPLOADS_DIR"]).rglob("*") if p.is_file())


# --------------------------------------------------------------------------
# domains

def test_domains_matches_seed(api):
    resp = api.get("/api/domains?type=free")
    assert resp.status_code == 200
    body = resp.get_json()
    assert_same_shape(body, DOMAINS)
    assert body["data"]["requested_type"] == "free"
    assert body["data"]["allowed_types"] == ["free"]
    assert body["data"]["domains"] == [
        {"domain": "example.com", "type": "Free", "custom": False},
        {"domain": "tempmail.test", "type": "Free", "custom": False}]


def test_domains_by_type_and_plan(app, client, api):
    assert api.get("/api/domains").get_json()["data"]["requested_type"] == "all"
    assert [d["domain"] for d in api.get("/api/domains?type=all").get_json()["data"]["domains"]] == \
        ["example.com", "tempmail.test"]
    denied = api.get("/api/domains?type=premium")
    assert denied.status_code == 403 and denied.get_json()["status"] is False
    bad = api.get("/api/domains?type=gold")
    assert bad.status_code == 422 and set(bad.get_json()) == {"status", "message"}
    premium = Api(client, make_user(app, "rich@example.org", plan="premium"))
    data = premium.get("/api/domains?type=premium").get_json()["data"]
    assert data["allowed_types"] == ["free", "premium"]
    assert data["domains"] == [{"domain": "vip.example.com", "type": "Premium", "custom": False}]
    assert len(premium.get("/api/domains?type=all").get_json()["data"]["domains"]) == 3


def test_domains_custom_flag(app, api):
    with app.app_context():
        models.Domain.ensure("mine.example.net", "free", custom=True)
        db.session.commit()
    domains = api.get("/api/domains?type=free").get_json()["data"]["domains"]
    assert {"domain": "mine.example.net", "type": "Free", "custom": True} in domains


# --------------------------------------------------------------------------
# mailboxes

def test_create_matches_seed(app, api, clock):
    resp = api.post("/api/emails")
    assert resp.status_code == 200
    body = resp.get_json()
    assert_same_shape(body, CREATED)
    data = body["data"]
    assert data["domain"] == "example.com" and data["email"].endswith("@example.com")
    assert data["expires_in_seconds"] == 600
    created = datetime.fromisoformat(data["created_at"])
    assert (datetime.fromisoformat(data["expire_at"]) - created).total_seconds() == 600
    assert created.utcoffset() is not None
    with app.test_request_context():
        box = models.Mailbox.from_token(data["email_token"])
        assert box.address == data["email"] and box.id == data["id"]
        assert box.user_id == User.by_email("dev@example.org").id


@pytest.mark.parametrize("how", ["query", "json", "form"])
def test_create_on_chosen_domain(api, how):
    kwargs = {"query": {"query_string": {"domain": "tempmail.test"}},
              "json": {"json": {"domain": "tempmail.test"}},
              "form": {"data": {"domain": "tempmail.test"}}}[how]
    resp = api.post("/api/emails", **kwargs)
    assert resp.status_code == 200
    assert resp.get_json()["data"]["domain"] == "tempmail.test"


def test_create_domain_errors(api):
    premium = api.post("/api/emails?domain=vip.example.com")
    assert premium.status_code == 403 and premium.get_json()["status"] is False
    unknown = api.post("/api/emails?domain=nowhere.example")
    assert unknown.status_code == 422 and "domain" in unknown.get_json()["message"].lower()
    assert api.post("/api/emails", json={"domain": 5}).status_code == 422


def test_create_uses_plan_lifetime(app, client):
    premium = Api(client, make_user(app, "rich@example.org", plan="premium"))
    data = premium.post("/api/emails?domain=vip.example.com").get_json()["data"]
    assert data["expires_in_seconds"] == 3600 and data["domain"] == "vip.example.com"


def test_switch_matches_seed_and_keeps_messages(app, api):
    current = new_mailbox(api)
    message_id = deliver(app, current)
    resp = api.post(f"/api/emails/{current}/demo123/example.com")
    assert resp.status_code == 200
    body = resp.get_json()
    assert_same_shape(body, SWITCHED)
    assert body["data"]["email"] == "demo123@example.com"
    listed = api.get("/api/messages?email=demo123@example.com").get_json()
    assert [m["id"] for m in listed["messages"]] == [message_id]
    assert api.get(f"/api/messages?email={current}").status_code == 404
    with app.test_request_context():
        assert models.Mailbox.from_token(body["data"]["email_token"]).address == "demo123@example.com"


def test_switch_keeps_the_email_token_as_the_docs_say(app, client, api):
    created = api.post("/api/emails").get_json()["data"]
    switched = api.post(f"/api/emails/{created['email']}/renamed42/example.com").get_json()["data"]
    # The token binds the mailbox (id + its own random value), not the address.
    assert switched["email_token"] == created["email_token"] and switched["id"] == created["id"]
    page = client.get(f"/m/{created['email_token']}")
    assert page.status_code == 200 and "renamed42@example.com" in page.get_data(as_text=True)
    docs = (ROOT / "docs" / "user-api.md").read_text()
    assert "with the same `email_token` as before" in docs
    assert "a token for the new address" not in docs


def test_switch_errors(app, api, other):
    current = new_mailbox(api)
    new_mailbox(other)
    other_box = other.post("/api/emails").get_json()["data"]["email"]
    cases = [(f"/api/emails/{current}/ab/example.com", 422, "Invalid username"),
             (f"/api/emails/{current}/admin/example.com", 422, "reserved"),
             (f"/api/emails/{current}/{other_box.split('@')[0]}/{other_box.split('@')[1]}", 422,
              "already taken"),
             (f"/api/emails/{current}/demo123/vip.example.com", 403, "plan"),
             (f"/api/emails/{current}/demo123/nowhere.example", 422, "domain"),
             ("/api/emails/nobody@example.com/demo123/example.com", 404, "not found"),
             (f"/api/emails/{other_box}/demo123/example.com", 404, "not found")]
    for path, status, words in cases:
        resp = api.post(path)
        assert resp.status_code == status, path
        assert words.lower() in resp.get_json()["message"].lower(), path
    assert api.get(f"/api/messages?email={current}").status_code == 200


def test_delete_mailbox_matches_seed_and_removes_files(app, api):
    address = new_mailbox(api)
    deliver(app, address)
    assert uploads_files(app)
    resp = api.delete(f"/api/emails/{address}")
    assert resp.status_code == 200 and resp.get_json() == MAILBOX_DELETED
    assert uploads_files(app) == []
    with app.app_context():
        assert db.session.scalar(models.select(models.func.count()).select_from(Message)) == 0
    again = api.delete(f"/api/emails/{address}")
    assert again.status_code == 404 and again.get_json() == {"status": False, "message": "Email not found."}


def test_expired_mailbox_is_gone(app, api, clock):
    address = new_mailbox(api)
    message_id = deliver(app, address)
    clock.advance(601)
    assert api.get(f"/api/messages?email={address}").status_code == 404
    assert api.get(f"/api/messages/{message_id}").status_code == 404
    assert api.delete(f"/api/emails/{address}").status_code == 404


# --------------------------------------------------------------------------
# messages

def test_list_matches_seed(app, api):
    address = new_mailbox(api)
    first = deliver(app, address)
    second = deliver(app, address, html="", text="Plain words.", attachments=())
    body = api.get(f"/api/messages?email={quote(address)}").get_json()
    assert body["mailbox"] == address
    assert [m["id"] for m in body["messages"]] == [second, first]  # newest first
    assert_same_shape({**body, "messages": body["messages"][1:]}, MESSAGES)
    html_msg, text_msg = body["messages"][1], body["messages"][0]
    assert html_msg["html"] is True and html_msg["content"] == "<p>Hello from the inbox.</p>"
    assert text_msg["html"] is False and text_msg["content"] == "Plain words." and text_msg["attachments"] == []
    assert html_msg["from"] == "Example Sender" and html_msg["from_email"] == "hello@example.org"
    assert html_msg["to"] == address and html_msg["is_seen"] is False
    assert html_msg["attachments"] == [{
        "name": "file.txt", "extension": "txt", "size": 91,
        "url": f"http://localhost/api/messages/{first}/attachments/file.txt"}]


def test_public_ids_are_random(app, api):
    address = new_mailbox(api)
    ids = [deliver(app, address, attachments=()) for _ in range(3)]
    assert len(set(ids)) == 3
    for public_id in ids:
        assert len(public_id) == 46 and public_id.isalnum() and public_id.isascii()


def test_list_requires_email(api):
    resp = api.get("/api/messages")
    assert resp.status_code == 422 and resp.get_json()["status"] is False


def test_read_matches_seed_and_marks_seen(app, api):
    address = new_mailbox(api)
    message_id = deliver(app, address)
    resp = api.get(f"/api/messages/{message_id}")
    assert resp.status_code == 200
    body = resp.get_json()
    assert_same_shape(body, MESSAGE)
    assert body["data"]["is_seen"] is True and body["data"]["id"] == message_id
    listed = api.get(f"/api/messages?email={address}").get_json()["messages"]
    assert listed[0]["is_seen"] is True


def test_delete_message_matches_seed(app, api):
    address = new_mailbox(api)
    message_id = deliver(app, address)
    resp = api.delete(f"/api/messages/{message_id}")
    assert resp.status_code == 200 and resp.get_json() == MESSAGE_DELETED
    assert uploads_files(app) == []
    assert api.get(f"/api/messages/{message_id}").status_code == 404
    assert api.delete(f"/api/messages/{message_id}").get_json() == \
        {"status": False, "message": "Message not found."}


def test_download_attachment(app, api):
    address = new_mailbox(api)
    message_id = deliver(app, address, attachments=(
        {"filename": "file.txt", "data": b"hello attachment", "content_type": "text/plain"},
        {"filename": "page.html", "data": b"<script>alert(1)</script>", "content_type": "text/html"}))
    resp = api.get(f"/api/messages/{message_id}/attachments/file.txt")
    assert resp.status_code == 200 and resp.data == b"hello attachment"
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert resp.headers["Content-Disposition"].startswith("attachment")
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    html = api.get(f"/api/messages/{message_id}/attachments/page.html")
    assert html.headers["Content-Disposition"].startswith("attachment")
    missing = api.get(f"/api/messages/{message_id}/attachments/other.txt")
    assert missing.status_code == 404 and missing.get_json()["message"] == "Attachment not found."


def test_attachment_names_with_spaces_and_duplicates(app, api):
    address = new_mailbox(api)
    part = {"filename": "my report.pdf", "data": b"%PDF-1", "content_type": "application/pdf"}
    message_id = deliver(app, address, attachments=(part, {**part, "data": b"%PDF-2"}))
    atts = api.get(f"/api/messages/{message_id}").get_json()["data"]["attachments"]
    assert [a["name"] for a in atts] == ["my report.pdf", "my report (2).pdf"]
    second = api.get(atts[1]["url"].replace("http://localhost", ""))
    assert second.status_code == 200 and second.data == b"%PDF-2"


# --------------------------------------------------------------------------
# ownership: another user's things answer exactly like missing ones

def test_cross_user_access_is_not_found(app, api, other):
    address = new_mailbox(api)
    message_id = deliver(app, address)
    missing_box, missing_msg = "nobody@example.com", "A" * 46
    pairs = [
        (("get", f"/api/messages?email={address}"), ("get", f"/api/messages?email={missing_box}")),
        (("post", f"/api/emails/{address}/stolen1/example.com"),
         ("post", f"/api/emails/{missing_box}/stolen1/example.com")),
        (("delete", f"/api/emails/{address}"), ("delete", f"/api/emails/{missing_box}")),
        (("get", f"/api/messages/{message_id}"), ("get", f"/api/messages/{missing_msg}")),
        (("get", f"/api/messages/{message_id}/attachments/file.txt"),
         ("get", f"/api/messages/{missing_msg}/attachments/file.txt")),
        (("delete", f"/api/messages/{message_id}"), ("delete", f"/api/messages/{missing_msg}")),
    ]
    for (method, path), (missing_method, missing_path) in pairs:
        theirs = getattr(other, method)(path)
        nothing = getattr(other, missing_method)(missing_path)
        assert theirs.status_code == nothing.status_code == 404, path
        assert theirs.get_json() == nothing.get_json(), path
    # and nothing happened to the owner's mailbox or message
    body = api.get(f"/api/messages?email={address}").get_json()
    assert [m["id"] for m in body["messages"]] == [message_id] and body["messages"][0]["is_seen"] is False


# --------------------------------------------------------------------------
# authentication and error shapes

@pytest.mark.parametrize("header", [None, "Bearer", "Bearer ", "Basic dXNlcjpwYXNz",
                                    "Bearer tm_not-a-real-key", "Token x"])
def test_unauthenticated(client, header, api):
    headers = {"Authorization": header} if header is not None else {}
    for method, path in [("get", "/api/domains"), ("post", "/api/emails"), ("get", "/api/nope")]:
        resp = getattr(client, method)(path, headers=headers)
        assert resp.status_code == 401 and resp.is_json, (header, path)
        assert resp.get_json()["status"] is False and resp.get_json()["message"]
        assert "X-RateLimit-Limit" not in resp.headers
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")


def test_regenerate_and_revoke_work_at_once(app, client, api):
    assert api.get("/api/domains").status_code == 200
    with app.app_context():
        _key, fresh = ApiKey.issue(User.by_email("dev@example.org"))
        db.session.commit()
    assert api.get("/api/domains").status_code == 401
    new = Api(client, fresh)
    assert new.get("/api/domains").status_code == 200
    with app.app_context():
        User.by_email("dev@example.org").live_key().revoke()
        db.session.commit()
    assert new.get("/api/domains").status_code == 401


def test_unknown_route_and_wrong_method(api):
    missing = api.get("/api/nothing/here")
    assert missing.status_code == 404 and missing.get_json() == {"status": False, "message": "Not found."}
    assert missing.headers["X-RateLimit-Used"] == "0"
    wrong = api.put("/api/domains")
    assert wrong.status_code == 405 and wrong.get_json()["status"] is False
    assert api.delete("/api/messages").status_code == 405


def test_too_large_body_is_json(api):
    resp = api.post("/api/emails", data=b"x" * (2 * 1024 * 1024),
                    headers={"Content-Type": "application/json"})
    assert resp.status_code == 413 and resp.get_json()["status"] is False


def test_internal_error_is_json_without_traceback(app, api, monkeypatch):
    def broken(self):
        raise RuntimeError("secret internals")
    monkeypatch.setattr(api_v1, "domain_json", broken)
    app.config["PROPAGATE_EXCEPTIONS"] = False
    resp = api.get("/api/domains")
    assert resp.status_code == 500
    assert resp.get_json() == {"status": False, "message": "Internal server error."}
    assert b"secret" not in resp.data and b"Traceback" not in resp.data
    assert resp.headers["X-RateLimit-Used"] == "0"


def test_cors_preflight_needs_no_key(client):
    resp = client.options("/api/emails", headers={
        "Origin": "https://app.example.net", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "Authorization"})
    assert resp.status_code == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "*"


# --------------------------------------------------------------------------
# quota

def test_quota_headers_count_only_2xx(api):
    first = api.get("/api/domains")
    assert first.headers["X-RateLimit-Limit"] == "50000"
    assert first.headers["X-RateLimit-Used"] == "1"
    assert first.headers["X-RateLimit-Remaining"] == "49999"
    for failing in ("/api/domains?type=premium", "/api/messages", "/api/messages?email=x@example.com"):
        resp = api.get(failing)
        assert resp.status_code >= 400 and resp.headers["X-RateLimit-Used"] == "1"
    second = api.post("/api/emails")
    assert second.headers["X-RateLimit-Used"] == "2"
    assert all(h in second.headers for h in QUOTA_HEADERS)


def test_quota_is_per_user_and_survives_key_regeneration(app, client, api, other):
    api.get("/api/domains")
    api.get("/api/domains")
    assert other.get("/api/domains").headers["X-RateLimit-Used"] == "1"
    with app.app_context():
        _key, fresh = ApiKey.issue(User.by_email("dev@example.org"))
        db.session.commit()
    assert Api(client, fresh).get("/api/domains").headers["X-RateLimit-Used"] == "3"


def test_reset_is_next_month_in_configured_zone(app_factory, clock, client):
    app = app_factory({"timezone": "Asia/Karachi"})
    clock.now = datetime(2026, 4, 30, 18, 59, 59)  # 23:59:59 in Karachi (+05:00)
    api = Api(app.test_client(), make_user(app))
    resp = api.get("/api/domains")
    assert resp.headers["X-RateLimit-Reset"] == "2026-05-01T00:00:00+05:00"
    clock.advance(1)
    assert api.get("/api/domains").headers["X-RateLimit-Reset"] == "2026-06-01T00:00:00+05:00"


def test_december_rolls_into_next_year(app, api, clock):
    clock.now = datetime(2026, 12, 15, 12, 0, 0)
    assert api.get("/api/domains").headers["X-RateLimit-Reset"] == "2027-01-01T00:00:00+00:00"


def test_over_quota_is_429_without_effect(app_factory, clock):
    plans = {"free": {"monthly_quota": 3, "domain_types": ["free"], "mailbox_lifetime_seconds": 600}}
    app = app_factory({"plans": plans})
    clock.now = datetime(2026, 3, 31, 23, 0, 0)
    api = Api(app.test_client(), make_user(app))
    for _ in range(3):
        assert api.post("/api/emails").status_code == 200
    with app.app_context():
        boxes = db.session.scalar(models.select(models.func.count()).select_from(Mailbox))
    refused = api.post("/api/emails")
    assert refused.status_code == 429
    assert refused.get_json()["status"] is False and "quota" in refused.get_json()["message"].lower()
    assert refused.headers["Retry-After"] == str(3600)
    assert refused.headers["X-RateLimit-Remaining"] == "0" and refused.headers["X-RateLimit-Used"] == "3"
    with app.app_context():
        assert db.session.scalar(models.select(models.func.count()).select_from(Mailbox)) == boxes
    # the next month starts with a fresh quota; the old month's row stays as it was
    clock.advance(3600)
    again = api.get("/api/domains")
    assert again.status_code == 200 and again.headers["X-RateLimit-Used"] == "1"
    assert again.headers["X-RateLimit-Reset"] == "2026-05-01T00:00:00+00:00"
    with app.app_context():
        rows = db.session.execute(models.select(QuotaUsage.period, QuotaUsage.used)
                                  .order_by(QuotaUsage.period)).all()
        assert [tuple(r) for r in rows] == [("2026-03", 3), ("2026-04", 1)]


def test_quota_status_for_the_management_page(app, api, clock):
    api.get("/api/domains")
    with app.app_context():
        status = limits.quota_status(User.by_email("dev@example.org"))
    assert (status["limit"], status["used"], status["remaining"]) == (50000, 1, 49999)
    assert status["reset"].day == 1 and status["reset"].utcoffset() is not None


# --------------------------------------------------------------------------
# CLI

def test_cli_users_and_keys(app, client, runner):
    made = runner.invoke(args=["users", "create", "Cli@Example.org", "--plan", "premium",
                               "--password", "s3cret-pass"])
    assert made.exit_code == 0, made.output
    issued = runner.invoke(args=["keys", "create", "cli@example.org"])
    assert issued.exit_code == 0, issued.output
    key = issued.output.strip().splitlines()[-1]
    assert key.startswith("tm_") and len(key) > 40
    api = Api(client, key)
    assert api.get("/api/domains?type=premium").status_code == 200
    with app.app_context():
        user = User.by_email("cli@example.org")
        assert user.check_password("s3cret-pass") and not user.check_password("wrong")
        prefix = user.live_key().prefix
    assert key.startswith(prefix)
    revoked = runner.invoke(args=["keys", "revoke", prefix])
    assert revoked.exit_code == 0, revoked.output
    assert api.get("/api/domains").status_code == 401


def test_cli_errors(runner):
    assert runner.invoke(args=["users", "create", "not-an-email"]).exit_code != 0
    assert runner.invoke(args=["users", "create", "a@example.org", "--plan", "gold"]).exit_code != 0
    assert runner.invoke(args=["users", "create", "a@example.org"]).exit_code == 0
    duplicate = runner.invoke(args=["users", "create", "A@example.org"])
    assert duplicate.exit_code != 0 and "exists" in duplicate.output
    assert runner.invoke(args=["keys", "create", "nobody@example.org"]).exit_code != 0
    assert runner.invoke(args=["keys", "revoke", "tm_nothing"]).exit_code != 0
