"""API 1, the api.php-compatible API: every route and error, compared with seed 004."""
from __future__ import annotations

import threading
from pathlib import Path
from urllib.parse import quote

import pytest

import models
from models import Mailbox, db
from seeds import examples
from shapes import assert_same_shape
import mailhandler  # noqa: E402
import storage  # noqa: E402

SEED = examples("004")
(GENERATE, INVALID, RESERVED, TAKEN, INBOX, INBOX_404, DETAIL, DETAIL_404, DELETED,
 STATS, DOMAINS, CONFIG_404, ENDPOINT_404, METHOD_405) = SEED
PREFIXES = ["/api.php", ""]
RESERVED_NAMES = ["admin", "administrator", "root", "system", "info", "contact", "support",
                  "help", "webmaster", "postmaster", "noreply", "abuse", "security",
                  "hostmaster", "mailer", "www", "ftp", "mail"]


def test_seed_has_every_example():
    assert len(SEED) == 14


def deliver(app, address, subject="Welcome!", attachments=(), html="<h1>Hi</h1>"):
    """Store a message the way the receiver does (the receiver has its own tests)."""
    with app.app_context():
        box = Mailbox.find_live(address)
        msg = mailhandler.store_message(box, {
            "from_email": "sender@example.org", "from_name": "John Doe", "subject": subject,
            "body_text": "Hello, welcome to our service!", "body_html": html,
            "envelope_to": address}, b"Subject: x\r\n\r\nbody\r\n", attachments)
        db.session.commit()
        return msg.legacy_id  # the id api.php shows (see idgen)


@pytest.fixture
def mailbox(client):
    return client.get("/api.php/generate?username=johnsmith").get_json()["email"]


@pytest.mark.parametrize("prefix", PREFIXES)
def test_generate_random_matches_seed(client, prefix):
    resp = client.get(f"{prefix}/generate")
    assert resp.status_code == 200
    body = resp.get_json()
    assert_same_shape(body, GENERATE)
    assert body["email"] == f"{body['username']}@{body['domain']}"
    assert body["username"].isalnum() and body["username"] not in RESERVED_NAMES
    assert any(c.isdigit() for c in body["username"]) and body["username"][0].isalpha()


def test_generate_custom_is_lower_cased(client):
    body = client.get("/api.php/generate?username=JohnSmith").get_json()
    assert body["email"] == "johnsmith@example.com" and body["username"] == "johnsmith"


def test_generate_expiry_uses_configured_lifetime(app_factory, clock):
    client = app_factory({"mailbox_lifetime_seconds": 3600}).test_client()
    body = client.get("/generate?username=timed").get_json()
    assert body["expires_at"] == (clock.now.replace(microsecond=0)
                                  + __import__("datetime").timedelta(hours=1)).strftime("%Y-%m-%d %H:%M:%S")


def test_timestamps_use_configured_timezone(app_factory, clock):
    client = app_factory({"timezone": "Asia/Jakarta", "mailbox_lifetime_seconds": 0}).test_client()
    body = client.get("/generate?username=jakarta").get_json()
    from datetime import timedelta
    assert body["expires_at"] == (clock.now + timedelta(hours=7)).strftime("%Y-%m-%d %H:%M:%S")


@pytest.mark.parametrize("username", [
    "ab", "a" * 21, "john smith", "john.smith", "jöhn", "ｊｏｈｎ", "١٢٣abc", "ab_c", "a-b-c",
    "x' OR '1'='1", "a;DROP TABLE mailboxes", "../etc", "..%2Fapp", "a/b", "a\\b", "name\x00x",
    "<script>", "user@host", " ", "\t\t\t"])
def test_generate_rejects_invalid_usernames(client, username):
    resp = client.get("/api.php/generate", query_string={"username": username})
    if username.strip() == "":
        assert resp.status_code == 200  # blank means "random", as PHP's empty() did
        return
    assert resp.status_code == 400
    assert resp.get_json() == INVALID


@pytest.mark.parametrize("username", ["abc", "a" * 20, "ABC123", "007"])
def test_generate_accepts_boundary_usernames(client, username):
    resp = client.get("/generate", query_string={"username": username})
    assert resp.status_code == 200
    assert resp.get_json()["username"] == username.lower()


@pytest.mark.parametrize("name", RESERVED_NAMES + ["ADMIN", "PostMaster"])
def test_generate_rejects_reserved(client, name):
    resp = client.get("/generate", query_string={"username": name})
    assert resp.status_code == 400
    assert resp.get_json() == RESERVED


def test_generate_taken_while_live_free_after_expiry(app, client, clock):
    assert client.get("/generate?username=dupe").status_code == 200
    resp = client.get("/generate?username=DUPE")
    assert resp.status_code == 409 and resp.get_json() == TAKEN
    deliver(app, "dupe@example.com")
    clock.advance(86401)
    resp = client.get("/generate?username=dupe")
    assert resp.status_code == 200
    inbox = client.get("/inbox/dupe@example.com").get_json()
    assert inbox["total"] == 0  # the new owner never sees the old owner's mail


def test_generate_domain_parameter(client):
    body = client.get("/generate?username=second&domain=TempMail.test").get_json()
    assert body["domain"] == "tempmail.test" and body["email"] == "second@tempmail.test"
    for bad in ("vip.example.com", "nowhere.org", "../x"):
        resp = client.get("/generate", query_string={"domain": bad})
        assert resp.status_code == 400
        body = resp.get_json()
        assert body["success"] is False and "domain" in body["error"].lower()


def test_generate_same_name_on_two_domains(client):
    assert client.get("/generate?username=twin").status_code == 200
    assert client.get("/generate?username=twin&domain=tempmail.test").status_code == 200


def test_concurrent_generates_exactly_one_wins(app):
    barrier = threading.Barrier(2)
    codes = []

    def attempt():
        client = app.test_client()
        barrier.wait()
        codes.append(client.get("/generate?username=racer").status_code)

    threads = [threading.Thread(target=attempt) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == [200, 409]
    with app.app_context():
        assert db.session.query(Mailbox).filter_by(address="racer@example.com").count() == 1


def test_config_not_found_without_domains(app_factory):
    client = app_factory({"domains": []}).test_client()
    for path in ("/api.php/generate", "/domains"):
        resp = client.get(path)
        assert resp.status_code == 500
        assert resp.get_json() == CONFIG_404


@pytest.mark.parametrize("prefix", PREFIXES)
def test_inbox_matches_seed_oldest_first(app, client, mailbox, prefix):
    first = deliver(app, mailbox, "Welcome!")
    second = deliver(app, mailbox, "Verify your email")
    client.get(f"/email/{second}")
    resp = client.get(f"{prefix}/inbox/{quote(mailbox)}")
    assert resp.status_code == 200
    body = resp.get_json()
    assert_same_shape(body, INBOX)
    assert [e["id"] for e in body["emails"]] == [first, second]
    assert [e["is_read"] for e in body["emails"]] == [0, 1]
    assert body["total"] == 2 and body["email"] == mailbox


@pytest.mark.parametrize("form", ["johnsmith@example.com", "johnsmith%40example.com",
                                  "JohnSmith%40Example.COM", "johnsmith%2540example.com"])
def test_inbox_address_forms(client, mailbox, form):
    resp = client.get(f"/api.php/inbox/{form}")
    assert resp.status_code == 200 and resp.get_json()["email"] == mailbox


def test_inbox_limit_offset(app, client, mailbox):
    ids = [deliver(app, mailbox, f"m{i}") for i in range(5)]
    body = client.get(f"/inbox/{mailbox}?limit=2&offset=1").get_json()
    assert [e["id"] for e in body["emails"]] == ids[1:3] and body["total"] == 5
    for bad in ("limit=-1", "limit=abc", "offset=1.5", "limit=100000"):
        resp = client.get(f"/inbox/{mailbox}?{bad}")
        assert resp.status_code == 400 and resp.get_json()["success"] is False


@pytest.mark.parametrize("address", ["test@yourdomain.com", "nobody@example.com", "garbage", "%00"])
def test_inbox_unknown_matches_seed(client, address):
    resp = client.get(f"/api.php/inbox/{address}")
    assert resp.status_code == 404
    body = resp.get_json()
    assert_same_shape(body, INBOX_404)
    assert body["hint"] == INBOX_404["hint"] and body["error"] == "Email not found"


def test_inbox_expired_is_not_found(client, mailbox, clock):
    clock.advance(86400)
    assert client.get(f"/inbox/{mailbox}").status_code == 404


def test_email_detail_matches_seed_and_marks_read(app, client, mailbox):
    msg_id = deliver(app, mailbox, attachments=[{
        "filename": "document.pdf", "data": b"%PDF-1.4 binary\x00\xff", "content_type": "application/pdf"}])
    resp = client.get(f"/api.php/email/{msg_id}")
    assert resp.status_code == 200
    body = resp.get_json()
    assert_same_shape(body, DETAIL)
    assert body["email"]["is_read"] == 1 and body["email"]["body_html"] == "<h1>Hi</h1>"
    att = body["attachments"][0]
    assert att["filename"] == "document.pdf" and att["size"] == 17
    download = client.get(att["file_path"])
    assert download.status_code == 200 and download.data == b"%PDF-1.4 binary\x00\xff"
    assert download.headers["Content-Disposition"].startswith("attachment")
    assert download.headers["X-Content-Type-Options"] == "nosniff"
    assert download.mimetype == "application/pdf"


@pytest.mark.parametrize("raw_id", ["999", "abc", "1.5", "-1", "99999999999999999999"])
def test_email_missing_matches_seed(client, raw_id):
    for method in (client.get, client.delete):
        resp = method(f"/api.php/email/{raw_id}")
        assert resp.status_code == 404 and resp.get_json() == DETAIL_404


def test_email_of_expired_mailbox_is_gone(app, client, mailbox, clock):
    msg_id = deliver(app, mailbox)
    clock.advance(86400)
    assert client.get(f"/email/{msg_id}").status_code == 404


def test_delete_matches_seed_and_removes_files(app, client, mailbox):
    msg_id = deliver(app, mailbox, attachments=[{"filename": "a.txt", "data": b"abc"}])
    with app.app_context():
        msg = models.Message.by_legacy_id(str(msg_id))
        files = [storage.blob_path(a.sha256) for a in msg.attachments] + [storage.blob_path(msg.raw_sha256)]
    assert all(f.exists() for f in files)
    resp = client.delete(f"/api.php/email/{msg_id}")
    assert resp.status_code == 200
    assert_same_shape(resp.get_json(), DELETED)
    assert resp.get_json()["deleted_id"] == str(msg_id)
    assert not any(f.exists() for f in files)
    assert client.get(f"/email/{msg_id}").status_code == 404
    assert client.delete(f"/email/{msg_id}").status_code == 404


def test_stats_matches_seed_and_counts(app, client, mailbox):
    client.get("/generate")
    first = deliver(app, mailbox)
    deliver(app, mailbox)
    client.delete(f"/email/{first}")
    resp = client.get("/api.php/stats")
    assert resp.status_code == 200
    body = resp.get_json()
    assert_same_shape(body, STATS)
    stats = body["stats"]
    assert (stats["total_emails"], stats["total_addresses"], stats["total_received"]) == (1, 2, 2)


def test_domains_matches_seed(client):
    resp = client.get("/api.php/domains")
    assert resp.status_code == 200
    body = resp.get_json()
    assert_same_shape(body, DOMAINS)
    assert body["domains"] == ["example.com", "tempmail.test"]  # Free domains: what /generate takes


@pytest.mark.parametrize("path", ["/unknown", "/api.php/unknown", "/api.php/", "/api.php/generate/x"])
def test_unknown_endpoint(client, path):
    resp = client.get(path)
    assert resp.status_code == 404
    assert_same_shape(resp.get_json(), ENDPOINT_404)
    expected = path[len("/api.php"):] if path.startswith("/api.php/") else path
    assert resp.get_json()["error"] == f"Invalid endpoint: {expected}"


@pytest.mark.parametrize("method,path", [("post", "/generate"), ("put", "/api.php/email/1"),
                                          ("delete", "/api.php/inbox/a@example.com"),
                                          ("post", "/stats"), ("patch", "/api.php/domains")])
def test_method_not_allowed(client, method, path):
    resp = getattr(client, method)(path)
    assert resp.status_code == 405 and resp.get_json() == METHOD_405


def test_cors(client):
    resp = client.get("/api.php/stats", headers={"Origin": "https://elsewhere.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "*"
    pre = client.options("/api.php/email/1", headers={
        "Origin": "https://elsewhere.example", "Access-Control-Request-Method": "DELETE"})
    assert pre.status_code in (200, 204) and "DELETE" in pre.headers["Access-Control-Allow-Methods"]


def test_cors_restricted_origin(app_factory):
    client = app_factory({"cors_origins": ["https://ok.example"]}).test_client()
    ok = client.get("/stats", headers={"Origin": "https://ok.example"})
    bad = client.get("/stats", headers={"Origin": "https://evil.example"})
    assert ok.headers["Access-Control-Allow-Origin"] == "https://ok.example"
    assert "Access-Control-Allow-Origin" not in bad.headers


def test_attachment_path_never_from_sender(app, client, mailbox):
    msg_id = deliver(app, mailbox, attachments=[{"filename": "../../../etc/passwd", "data": b"x"}])
    with app.app_context():
        stored = models.Message.by_legacy_id(str(msg_id)).attachments[0].sha256
        root = Path(app.config["UPLOADS_DIR"]).resolve()
        assert root in storage.blob_path(stored).parents and "passwd" not in stored
    att = client.get(f"/email/{msg_id}").get_json()["attachments"][0]
    assert client.get(att["file_path"]).data == b"x"


def test_generate_rate_limited_per_client(app_factory, clock):
    app = app_factory({"rate_limits": {"mailbox_create": {"limit": 3, "window_seconds": 60}}})
    client = app.test_client()
    codes = [client.get("/generate").status_code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    resp = client.get("/api.php/generate")
    assert resp.get_json()["success"] is False and 0 < int(resp.headers["Retry-After"]) <= 60
    other = client.get("/generate", environ_base={"REMOTE_ADDR": "10.9.9.9"})
    assert other.status_code == 200  # another client is not punished
    clock.advance(61)
    assert client.get("/generate").status_code == 200
