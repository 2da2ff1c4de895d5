"""The temp-mail page through Flask's test client, on SQLite and PostgreSQL:
every page, form and JSON endpoint, CSRF, ownership, ETag/304 and headers."""
from __future__ import annotations

import re
from datetime import timedelta

import pytest
from sqlalchemy import select

import models
from models import Mailbox, Message, db
import mailhandler  # noqa: E402
import storage  # noqa: E402

TOKEN_RE = re.compile(r'name="csrf_token" value="([^"]+)"')
ADDRESS_RE = re.compile(r'id="address"[^>]*value="([^"]+)"')
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


def page_address(client) -> str:
    return ADDRESS_RE.search(client.get("/").get_data(as_text=True)).group(1)


def csrf(client) -> str:
    return TOKEN_RE.search(client.get("/").get_data(as_text=True)).group(1)


def post(client, url, data=None, **kwargs):
    """A form POST carrying this client's CSRF token."""
    return client.post(url, data={"csrf_token": csrf(client), **(data or {})}, **kwargs)


def deliver(app, address: str, subject: str = "Hello", html: str = "", text: str = "Hi there",
            attachments=()) -> int:
    """Store a message straight through models (the parser has its own tests)."""
    with app.app_context():
        box = Mailbox.find_live(address)
        msg = mailhandler.store_message(box, {"from_email": "sender@example.org", "from_name": "Sender",
                                         "subject": subject, "body_text": text, "body_html": html},
                                   b"Subject: " + subject.encode() + b"\r\n\r\n" + text.encode(),
                                   attachments)
        db.session.commit()
        return msg.id


def box_of(app, address: str) -> Mailbox | None:
    with app.app_context():
        box = Mailbox.find_live(address)
        if box is not None:
            db.session.expunge(box)
        return box


# --------------------------------------------------------------------------
# the address

def test_first_visit_gets_a_live_address_owned_by_the_session(app, client):
    resp = client.get("/")
    assert resp.status_code == 200
    html = resp.get_data(as_text=True)
    address = ADDRESS_RE.search(html).group(1)
    assert re.fullmatch(r"[a-z]+\d+@example\.com", address)
    assert 'data-copy="address"' in html and "Expires in" in html
    assert resp.headers["Cache-Control"] == "no-store"
    assert page_address(client) == address  # same browser, same address
    other = app.test_client()
    assert page_address(other) != address
    box = box_of(app, address)
    assert box.session_id and box.user_id is None


def test_lifetime_comes_from_the_config(app_factory):
    app = app_factory({"mailbox_lifetime_seconds": 600})
    address = page_address(app.test_client())
    box = box_of(app, address)
    assert box.expires_at - box.created_at == timedelta(seconds=600)


def test_expired_address_is_replaced_on_the_next_visit(app, client, clock):
    first = page_address(client)
    clock.advance(86400 + 1)
    second = page_address(client)
    assert second != first
    assert box_of(app, second) is not None


def test_page_lists_messages_with_unread_marks(app, client):
    address = page_address(client)
    deliver(app, address, subject="Your code is 1234")
    html = client.get("/").get_data(as_text=True)
    assert "Your code is 1234" in html and 'class="msg unread"' in html
    assert "Unread: " in html


def test_no_domain_configured_is_a_friendly_page(app_factory):
    app = app_factory({"domains": []})
    resp = app.test_client().get("/")
    assert resp.status_code == 503
    assert "No mail domain is set up yet" in resp.get_data(as_text=True)


# --------------------------------------------------------------------------
# live list: ETag / 304

def test_inbox_json_and_conditional_requests(app, client):
    address = page_address(client)
    first = client.get("/web/inbox.json")
    assert first.status_code == 200 and first.json["messages"] == []
    assert first.json["address"] == address and 0 < first.json["expires_in"] <= 86400
    tag = first.headers["ETag"]
    again = client.get("/web/inbox.json", headers={"If-None-Match": tag})
    assert again.status_code == 304 and again.data == b""

    msg_id = deliver(app, address, subject="Welcome")
    fresh = client.get("/web/inbox.json", headers={"If-None-Match": tag})
    assert fresh.status_code == 200 and fresh.headers["ETag"] != tag
    row = fresh.json["messages"][0]
    assert row["subject"] == "Welcome" and row["is_read"] is False and row["url"] == f"/web/messages/{msg_id}"
    assert re.fullmatch(r"\d\d:\d\d", row["received"]) and row["received_full"] in row["received_at"].replace("T", " ")

    tag = fresh.headers["ETag"]
    client.get(f"/web/messages/{msg_id}")  # reading changes the unread mark
    read = client.get("/web/inbox.json", headers={"If-None-Match": tag})
    assert read.status_code == 200 and read.json["messages"][0]["is_read"] is True


def test_inbox_json_is_newest_first(app, client):
    address = page_address(client)
    ids = [deliver(app, address, subject=f"m{i}") for i in range(3)]
    assert [m["id"] for m in client.get("/web/inbox.json").json["messages"]] == ids[::-1]


def test_etag_changes_when_the_address_changes(app, client):
    page_address(client)
    tag = client.get("/web/inbox.json").headers["ETag"]
    post(client, "/web/address", {"username": "renamed42", "domain": "tempmail.test"})
    resp = client.get("/web/inbox.json", headers={"If-None-Match": tag})
    assert resp.status_code == 200 and resp.json["address"] == "renamed42@tempmail.test"


# --------------------------------------------------------------------------
# reading

def test_message_page_marks_read_and_offers_downloads(app, client):
    address = page_address(client)
    msg_id = deliver(app, address, subject="Report", text="See https://example.org/x?a=1&b=2.",
                     attachments=[{"filename": "report.pdf", "data": b"%PDF-1.4 data",
                                   "content_type": "application/pdf"}])
    resp = client.get(f"/web/messages/{msg_id}")
    html = resp.get_data(as_text=True)
    assert resp.status_code == 200 and "Report" in html
    assert f'href="/web/messages/{msg_id}/raw"' in html and "Download .eml" in html
    assert "report.pdf" in html and "<iframe" not in html  # text-only mail
    assert '<a href="https://example.org/x?a=1&amp;b=2" target="_blank" rel="noopener noreferrer">' in html
    with app.app_context():
        assert db.session.get(Message, msg_id).is_read is True
        att_id = db.session.get(Message, msg_id).attachments[0].id
    download = client.get(f"/web/messages/{msg_id}/attachments/{att_id}")
    assert download.status_code == 200 and download.data == b"%PDF-1.4 data"
    assert download.headers["Content-Disposition"].startswith("attachment")
    assert download.headers["Content-Security-Policy"] == "default-src 'none'; sandbox"
    raw = client.get(f"/web/messages/{msg_id}/raw")
    assert raw.status_code == 200 and raw.data.startswith(b"Subject: Report")
    assert raw.mimetype == "message/rfc822" and ".eml" in raw.headers["Content-Disposition"]


def test_a_message_kept_in_a_row_of_its_own_downloads_and_shows_its_source(app, client):
    """As shipped, a small message's bytes are a row of their own
    (``storage.source_in_row``), not a blob: the .eml download and the
    source view read them from there, byte for byte."""
    app.config["TEMPMAIL"]["storage"]["inline_max_bytes"] = 131072  # as shipped (the suite's app: files)
    address = page_address(client)
    msg_id = deliver(app, address, subject="Own row", text="kept beside its message")
    with app.app_context():
        kept = storage.own_source(msg_id)
        assert kept is not None and b"Subject: Own row" in kept
        assert db.session.scalar(select(models.Blob.sha256)) is None  # no blob at all
    raw = client.get(f"/web/messages/{msg_id}/raw")
    assert raw.status_code == 200 and raw.data == kept and raw.mimetype == "message/rfc822"
    assert raw.headers["Content-Disposition"].startswith("attachment")
    assert raw.headers["Content-Length"] == str(len(kept))
    source = client.get(f"/web/messages/{msg_id}?view=source").get_data(as_text=True)
    assert "Subject: Own row" in source and "kept beside its message" in source


def test_html_message_is_shown_in_a_sandboxed_frame(app, client):
    address = page_address(client)
    msg_id = deliver(app, address, html='<p>Hi<img src="https://tracker.example/p.gif"></p>')
    html = client.get(f"/web/messages/{msg_id}").get_data(as_text=True)
    frame = re.search(r"<iframe[^>]*>", html, re.S).group(0)
    # Same origin so the page can read the mail's height and size the frame to
    # it; never together with allow-scripts (a frame could then lift its sandbox).
    assert 'sandbox="allow-popups allow-popups-to-escape-sandbox allow-same-origin"' in frame
    assert "allow-scripts" not in frame and "allow-top-navigation" not in frame and "allow-forms" not in frame
    assert 'referrerpolicy="no-referrer"' in frame
    assert "1 remote image blocked" in html and f"/web/messages/{msg_id}?remote=1" in html
    partial = client.get(f"/web/messages/{msg_id}?partial=1").get_data(as_text=True)
    assert "<iframe" in partial and "<html" not in partial


def test_frame_route_sends_its_own_strict_policy(app, client):
    address = page_address(client)
    msg_id = deliver(app, address, html='<p onclick="x()">Hi<img src="https://t.example/p.gif">'
                                        '<img src="cid:logo@x"><script>alert(1)</script></p>',
                     attachments=[{"filename": "logo.png", "data": PNG, "content_type": "image/png",
                                   "content_id": "<logo@x>", "inline": True}])
    resp = client.get(f"/web/messages/{msg_id}/body")
    csp = resp.headers["Content-Security-Policy"]
    assert csp.startswith("default-src 'none'; img-src http://localhost/m/")
    for part in ("style-src 'unsafe-inline'", "base-uri 'none'", "form-action 'none'",
                 "frame-ancestors 'self'", "sandbox allow-popups allow-popups-to-escape-sandbox"):
        assert part in csp
    assert "https:" not in csp and "script" not in csp
    assert resp.headers["X-Frame-Options"] == "SAMEORIGIN"
    assert resp.headers["Referrer-Policy"] == "no-referrer"
    body = resp.get_data(as_text=True)
    assert "<script" not in body and "onclick" not in body and "t.example" not in body
    with app.app_context():
        box = Mailbox.find_live(address)
        att = db.session.get(Message, msg_id).attachments[0]
        cid_url = f"/m/{box.email_token()}/messages/{msg_id}/attachments/{att.id}"
    assert f'src="{cid_url}"' in body
    # The frame's image URL works without the session cookie (opaque origin).
    assert app.test_client().get(cid_url).data == PNG

    remote = client.get(f"/web/messages/{msg_id}/body?remote=1")
    assert "https:" in remote.headers["Content-Security-Policy"]
    assert 'src="https://t.example/p.gif"' in remote.get_data(as_text=True)


def test_plain_text_view_of_an_html_message(app, client):
    address = page_address(client)
    msg_id = deliver(app, address, html="<p>Rich</p>", text="Plain <b>version</b>")
    html = client.get(f"/web/messages/{msg_id}?view=text").get_data(as_text=True)
    assert "Plain &lt;b&gt;version&lt;/b&gt;" in html and "<iframe" not in html


# --------------------------------------------------------------------------
# only the session's own mailbox

def test_foreign_messages_answer_404(app, client):
    address = page_address(client)
    msg_id = deliver(app, address, attachments=[{"filename": "a.txt", "data": b"secret",
                                                  "content_type": "text/plain"}])
    with app.app_context():
        att_id = db.session.get(Message, msg_id).attachments[0].id
    stranger = app.test_client()
    page_address(stranger)
    for url in (f"/web/messages/{msg_id}", f"/web/messages/{msg_id}/body",
                f"/web/messages/{msg_id}/attachments/{att_id}", f"/web/messages/{msg_id}/raw",
                "/web/messages/999999"):
        resp = stranger.get(url)
        assert resp.status_code == 404, url
        assert b"secret" not in resp.data
        assert "This inbox or message is not here" in resp.get_data(as_text=True)
    json_resp = stranger.get(f"/web/messages/{msg_id}", headers={"Accept": "application/json"})
    assert json_resp.status_code == 404 and json_resp.json == {"error": "Not found"}
    assert post(stranger, f"/web/messages/{msg_id}/delete").status_code == 404
    with app.app_context():
        assert db.session.get(Message, msg_id) is not None


def test_attachment_of_another_message_is_404(app, client):
    address = page_address(client)
    first = deliver(app, address, attachments=[{"filename": "a.txt", "data": b"x", "content_type": "text/plain"}])
    second = deliver(app, address)
    with app.app_context():
        att_id = db.session.get(Message, first).attachments[0].id
    assert client.get(f"/web/messages/{second}/attachments/{att_id}").status_code == 404


def test_without_a_session_the_endpoints_are_404(app):
    fresh = app.test_client()
    assert fresh.get("/web/inbox.json").status_code == 404
    assert fresh.get("/web/messages/1").status_code == 404


# --------------------------------------------------------------------------
# forms: CSRF, change, new, delete

@pytest.mark.parametrize("url", ["/web/messages/1/delete", "/web/address", "/web/address/new",
                                 "/web/address/delete"])
def test_every_form_needs_the_csrf_token(app, client, url):
    address = page_address(client)
    deliver(app, address)
    resp = client.post(url, data={"username": "someone1", "domain": "example.com"})
    assert resp.status_code == 400 and b"CSRF" in resp.data
    assert box_of(app, address) is not None  # nothing happened


def test_change_address_keeps_the_messages(app, client):
    address = page_address(client)
    deliver(app, address, subject="Keep me")
    resp = post(client, "/web/address", {"username": "MyName77", "domain": "tempmail.test"},
                follow_redirects=True)
    html = resp.get_data(as_text=True)
    assert "Your address is now myname77@tempmail.test." in html
    assert page_address(client) == "myname77@tempmail.test"
    assert "Keep me" in html
    assert box_of(app, address) is None


@pytest.mark.parametrize("username, domain, status, error", [
    ("ab", "example.com", 400, "Invalid username. Use 3-20 alphanumeric characters only."),
    ("bad-name", "example.com", 400, "Invalid username. Use 3-20 alphanumeric characters only."),
    ("admin", "example.com", 400, "This username is reserved and cannot be used."),
    ("taken1", "example.com", 409, "Username already taken. Please choose another one."),
    ("fine123", "vip.example.com", 400, "Invalid domain. Choose one of the listed domains."),
    ("fine123", "nowhere.test", 400, "Invalid domain. Choose one of the listed domains."),
])
def test_change_address_errors(app, client, username, domain, status, error):
    with app.app_context():
        Mailbox.create("taken1", models.Domain.by_name("example.com"), 3600)
    address = page_address(client)
    shown = post(client, "/web/address", {"username": username, "domain": domain},
                 follow_redirects=True).get_data(as_text=True)
    assert error in shown and 'class="flash flash-error"' in shown
    assert page_address(client) == address
    as_json = post(client, "/web/address", {"username": username, "domain": domain},
                   headers={"Accept": "application/json"})
    assert as_json.status_code == status and as_json.json == {"ok": False, "message": error}


def test_new_random_address_drops_the_old_one(app, client):
    address = page_address(client)
    msg_id = deliver(app, address)
    resp = post(client, "/web/address/new")
    assert resp.status_code == 303 and resp.headers["Location"] == "/"
    new = page_address(client)
    assert new != address and box_of(app, address) is None
    with app.app_context():
        assert db.session.get(Message, msg_id) is None


def test_delete_address_leaves_the_visitor_without_one_until_asked(app, client):
    address = page_address(client)
    deliver(app, address)
    html = post(client, "/web/address/delete", follow_redirects=True).get_data(as_text=True)
    assert f"{address} and its messages are deleted." in html
    assert "You have no address right now" in html and 'id="address"' not in html
    assert box_of(app, address) is None
    assert "You have no address right now" in client.get("/").get_data(as_text=True)
    assert client.get("/web/inbox.json").status_code == 404
    post(client, "/web/address/new")
    assert box_of(app, page_address(client)) is not None


def test_delete_message_by_form_and_by_fetch(app, client):
    address = page_address(client)
    kept, gone_by_form, gone_by_fetch = (deliver(app, address, attachments=[  # distinct bytes: blobs are shared
        {"filename": "f.bin", "data": b"123%d" % n, "content_type": "application/octet-stream"}]) for n in range(3))
    with app.app_context():
        paths = [storage.blob_path(p) for p in db.session.scalars(
            select(models.Attachment.sha256).where(models.Attachment.message_id == gone_by_form))]
    resp = post(client, f"/web/messages/{gone_by_form}/delete", follow_redirects=True)
    assert "Message deleted." in resp.get_data(as_text=True)
    assert not any(p.exists() for p in paths)
    fetched = client.post(f"/web/messages/{gone_by_fetch}/delete",
                          headers={"X-CSRFToken": csrf(client), "Accept": "application/json"})
    assert fetched.status_code == 200 and fetched.json == {"ok": True, "message": "Message deleted."}
    ids = [m["id"] for m in client.get("/web/inbox.json").json["messages"]]
    assert ids == [kept]


# --------------------------------------------------------------------------
# /m/<token>: read-only inbox

def test_token_inbox_is_read_only(app, client):
    address = page_address(client)
    msg_id = deliver(app, address, subject="Via token", attachments=[
        {"filename": "t.txt", "data": b"token bytes", "content_type": "text/plain"}])
    with app.app_context():
        box = Mailbox.find_live(address)
        token = box.email_token()
        att_id = db.session.get(Message, msg_id).attachments[0].id
    visitor = app.test_client()
    html = visitor.get(f"/m/{token}").get_data(as_text=True)
    assert address in html and "Via token" in html and "Inbox of" in html
    assert "Delete address" not in html and "Change address" not in html
    assert f'href="/m/{token}/messages/{msg_id}"' in html
    reader = visitor.get(f"/m/{token}/messages/{msg_id}").get_data(as_text=True)
    assert "Via token" in reader and "/delete" not in reader
    assert visitor.get(f"/m/{token}/messages/{msg_id}/attachments/{att_id}").data == b"token bytes"
    assert visitor.get(f"/m/{token}/messages/{msg_id}/raw").status_code == 200
    assert visitor.get(f"/m/{token}/inbox.json").json["messages"][0]["id"] == msg_id


def test_token_scope_cannot_reach_other_mailboxes(app, client):
    own = page_address(client)
    other_client = app.test_client()
    foreign_msg = deliver(app, page_address(other_client))
    with app.app_context():
        token = Mailbox.find_live(own).email_token()
    assert client.get(f"/m/{token}/messages/{foreign_msg}").status_code == 404


@pytest.mark.parametrize("token", ["nonsense", "WzEsImFiYyJd.invalid-signature"])
def test_bad_token_is_a_friendly_404(client, token):
    resp = client.get(f"/m/{token}")
    assert resp.status_code == 404
    assert "This inbox or message is not here" in resp.get_data(as_text=True)
    assert client.get(f"/m/{token}/inbox.json").json == {"error": "Not found"}


def test_expired_token_is_404(app, client, clock):
    address = page_address(client)
    with app.app_context():
        token = Mailbox.find_live(address).email_token()
    assert client.get(f"/m/{token}").status_code == 200
    clock.advance(86400 + 1)
    assert client.get(f"/m/{token}").status_code == 404


# --------------------------------------------------------------------------
# headers

def test_site_wide_security_headers(client):
    resp = client.get("/")
    csp = resp.headers["Content-Security-Policy"]
    for part in ("default-src 'self'", "script-src 'self'", "object-src 'none'", "frame-ancestors 'none'"):
        assert part in csp
    assert "unsafe-inline" not in csp
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Referrer-Policy"] == "same-origin"
    static = client.get("/static/app.js")
    assert static.headers["X-Content-Type-Options"] == "nosniff"


def test_templates_have_no_inline_script_or_style(client):
    """The site CSP forbids inline code, so the pages must not rely on it."""
    html = client.get("/").get_data(as_text=True)
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)
    assert " style=" not in html and "<style" not in html
    assert not re.search(r"<[^>]+\son[a-z]+=", html)
