"""What issue 15 added to the temp-mail page, through Flask's test client on
SQLite and PostgreSQL: the reader (inline images not listed as files, human
sizes, the headers/source view), and the inbox (search, paging, the QR code,
"extend expiry", the first-visit line, the "Sign up" link)."""
from __future__ import annotations

import io
from datetime import timedelta

import pytest
import segno
from bs4 import BeautifulSoup

import mailhandler
import storage
from models import Mailbox, Message, db

from test_web import PNG, TOKEN_RE, csrf, page_address  # the page's own helpers, defined once


def deliver(app, address: str, subject: str = "Hello", html: str = "", text: str = "Hi there",
            attachments=(), sender: tuple = ("Sender", "sender@example.org"), raw: bytes | None = None) -> int:
    """Store a message straight through models (the parser has its own tests)."""
    with app.app_context():
        box = Mailbox.find_live(address)
        msg = mailhandler.store_message(box, {"from_email": sender[1], "from_name": sender[0],
                                         "subject": subject, "body_text": text, "body_html": html},
                                   raw or b"Subject: " + subject.encode() + b"\r\n\r\n" + text.encode(),
                                   attachments)
        db.session.commit()
        return msg.id


def soup(resp) -> BeautifulSoup:
    return BeautifulSoup(resp.get_data(as_text=True), "html.parser")


# --------------------------------------------------------------------------
# the reader

INLINE = {"filename": "logo.png", "data": PNG, "content_type": "image/png", "content_id": "<logo@shop>",
          "inline": True}
REAL = {"filename": "receipt.pdf", "data": b"%" * 157, "content_type": "application/pdf"}


def test_an_inline_image_shown_in_the_body_is_not_listed_as_a_file(app, client):
    address = page_address(client)
    msg_id = deliver(app, address, html='<p>Hi <img src="cid:logo@shop" alt="logo"></p>',
                     attachments=[INLINE, REAL])
    files = [li.select_one(".att-name").get_text() for li in
             soup(client.get(f"/web/messages/{msg_id}")).select(".attachments li")]
    assert files == ["receipt.pdf"]
    # The plain-text view shows no image, so there the inline one is a file like any other.
    files = [li.select_one(".att-name").get_text() for li in
             soup(client.get(f"/web/messages/{msg_id}?view=text")).select(".attachments li")]
    assert files == ["logo.png", "receipt.pdf"]
    assert client.get("/web/inbox.json").json["messages"][0]["attachments"] == 1


def test_only_inline_images_means_no_paper_clip(app, client):
    address = page_address(client)
    deliver(app, address, html='<img src="CID:%3Clogo@shop%3E">', attachments=[INLINE])  # any spelling
    assert client.get("/web/inbox.json").json["messages"][0]["attachments"] == 0
    assert not soup(client.get("/")).select(".msg .clip")


def test_an_unreferenced_image_and_a_linked_file_stay_listed(app, client):
    address = page_address(client)
    pdf = dict(REAL, content_id="<doc@shop>")
    msg_id = deliver(app, address, html='<p><a href="cid:doc@shop">the file</a></p>', attachments=[INLINE, pdf])
    files = [li.select_one(".att-name").get_text() for li in
             soup(client.get(f"/web/messages/{msg_id}")).select(".attachments li")]
    assert files == ["logo.png", "receipt.pdf"]


def test_sizes_are_human(app, client):
    address = page_address(client)
    msg_id = deliver(app, address, attachments=[REAL, {"filename": "big.bin", "data": b"x" * 1_258_291,
                                                       "content_type": "application/octet-stream"}])
    sizes = [s.get_text() for s in soup(client.get(f"/web/messages/{msg_id}")).select(".att-size")]
    assert sizes == ["157 B", "1.2 MB"]
    italian = [s.get_text() for s in soup(client.get(f"/web/messages/{msg_id}?lang=it")).select(".att-size")]
    assert italian == ["157 B", "1,2 MB"]


@pytest.mark.parametrize("size, text", [(0, "0 B"), (1023, "1023 B"), (1024, "1 KB"), (1536, "1.5 KB"),
                                        (10 * 1024 * 1024, "10 MB"), (3 * 1024 ** 3, "3 GB")])
def test_human_size_steps(app, size, text):
    import web
    with app.test_request_context("/"):
        assert web.human_size(size) == text


HOSTILE_RAW = (b"Received: from x by y\r\nFrom: Eve <eve@evil.example>\r\n"
               b"Subject: <script>alert(1)</script>\r\nX-Bidi: a\xe2\x80\xaeb\x1bc\r\n"
               b"Content-Type: text/plain; charset=utf-8\r\n\r\nBody <b>line</b> \xff\r\n")


def test_the_source_view_shows_headers_and_raw_text_escaped(app, client):
    address = page_address(client)
    msg_id = deliver(app, address, subject="<script>alert(1)</script>", raw=HOSTILE_RAW)
    resp = client.get(f"/web/messages/{msg_id}?view=source")
    html = resp.get_data(as_text=True)
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    page = soup(resp)
    headers = page.select_one("pre.raw-headers").get_text()
    assert headers.startswith("Received: from x by y\nFrom: Eve <eve@evil.example>")
    assert "Body" not in headers  # the header block only
    assert "a\ufffdb\ufffdc" in headers  # a bidi override and an escape code cannot act
    full = page.select_one("details.raw-full pre").get_text()
    assert "Body <b>line</b> \ufffd" in full
    assert page.select_one('.view-switch a[aria-current="true"]').get_text() == "Headers and source"
    partial = client.get(f"/web/messages/{msg_id}?view=source&partial=1").get_data(as_text=True)
    assert "raw-headers" in partial and "<html" not in partial


def test_a_large_source_is_cut_with_a_note(app, client):
    address = page_address(client)
    raw = b"Subject: big\r\n\r\n" + b"0123456789abcde\n" * 40000  # 640 KB
    msg_id = deliver(app, address, subject="big", raw=raw)
    page = soup(client.get(f"/web/messages/{msg_id}?view=source"))
    assert len(page.select_one("details.raw-full pre").get_text()) <= 256 * 1024
    note = page.select_one("details.raw-full .notice").get_text()
    assert "256 KB" in note and "(625 KB)" in page.select_one("details.raw-full summary").get_text()


def test_a_source_whose_file_is_gone_says_so(app, client):
    address = page_address(client)
    msg_id = deliver(app, address, subject="gone")
    with app.app_context():
        storage.blob_path(db.session.get(Message, msg_id).raw_sha256).unlink()
    resp = client.get(f"/web/messages/{msg_id}?view=source")
    assert resp.status_code == 200 and "no longer stored" in resp.get_data(as_text=True)


# --------------------------------------------------------------------------
# the inbox: search and paging

def fill(app, address: str, count: int) -> list[int]:
    return [deliver(app, address, subject=f"Order {i:03d}", sender=(f"Shop {i % 3}", f"s{i % 3}@shop.example"))
            for i in range(count)]


def listed(resp) -> list[str]:
    return [s.get_text(" ", strip=True).replace("Unread: ", "") for s in soup(resp).select(".msg .subject")]


def test_a_long_inbox_comes_in_pages_of_fifty(app, client):
    address = page_address(client)
    fill(app, address, 55)
    first = client.get("/")
    assert listed(first) == [f"Order {i:03d}" for i in range(54, 4, -1)]
    pager = soup(first).select_one("#pager")
    assert "hidden" not in pager.attrs and "1–50 of 55" in pager.get_text()
    assert soup(first).select_one("#pager-older")["href"] == "/?page=2"
    second = client.get("/?page=2")
    assert listed(second) == [f"Order {i:03d}" for i in range(4, -1, -1)]
    assert soup(second).select_one("#pager-newer")["href"] == "/"
    assert listed(client.get("/?page=99")) == listed(second)  # past the end: the last page
    assert listed(client.get("/?page=-3")) == listed(first)
    data = client.get("/web/inbox.json?page=2").json
    assert (data["total"], data["page"], data["pages"], data["first"], data["last"]) == (55, 2, 2, 51, 55)
    assert [m["subject"] for m in data["messages"]] == [f"Order {i:03d}" for i in range(4, -1, -1)]


def test_search_by_subject_or_sender(app, client):
    address = page_address(client)
    fill(app, address, 12)
    deliver(app, address, subject="50% off_today", sender=("Promo", "promo@deals.example"))
    assert listed(client.get("/?q=order+011")) == ["Order 011"]
    assert listed(client.get("/?q=SHOP 2")) == [f"Order {i:03d}" for i in (11, 8, 5, 2)]  # sender name
    assert listed(client.get("/?q=deals.example")) == ["50% off_today"]  # sender address
    assert listed(client.get("/?q=50%25")) == ["50% off_today"]  # LIKE wildcards match literally
    assert listed(client.get("/?q=0%25")) == ["50% off_today"]
    assert listed(client.get("/?q=f_t")) == ["50% off_today"]
    empty = client.get("/?q=nothing-like-this")
    assert listed(empty) == [] and "hidden" not in soup(empty).select_one("#no-match").attrs
    assert "hidden" in soup(empty).select_one("#empty").attrs
    assert soup(empty).select_one("#search")["value"] == "nothing-like-this"
    data = client.get("/web/inbox.json?q=order+01").json
    assert data["total"] == 2 and data["q"] == "order 01"
    assert client.get("/?q=" + "x" * 5000 + "%00").status_code == 200  # bounded, NUL dropped


def test_the_list_validator_depends_on_the_search(app, client):
    address = page_address(client)
    fill(app, address, 3)
    tag = client.get("/web/inbox.json").headers["ETag"]
    other = client.get("/web/inbox.json?q=order+001", headers={"If-None-Match": tag})
    assert other.status_code == 200 and [m["subject"] for m in other.json["messages"]] == ["Order 001"]
    same = client.get("/web/inbox.json?q=order+001", headers={"If-None-Match": other.headers["ETag"]})
    assert same.status_code == 304


def test_the_token_inbox_searches_and_pages_too(app, client):
    address = page_address(client)
    fill(app, address, 52)
    with app.app_context():
        token = Mailbox.find_live(address).email_token()
    visitor = app.test_client()
    page = visitor.get(f"/m/{token}?q=shop+1")
    assert listed(page)[0] == "Order 049" and len(listed(page)) == 17
    assert soup(page).select_one("form.inbox-search")["action"] == f"/m/{token}"
    assert soup(visitor.get(f"/m/{token}")).select_one("#pager-older")["href"] == f"/m/{token}?page=2"


# --------------------------------------------------------------------------
# the inbox: QR code, extend, first-visit line, navigation

def test_the_qr_code_holds_the_inbox_link(app, client):
    address = page_address(client)
    with app.app_context():
        link = "http://localhost/m/" + Mailbox.find_live(address).email_token()
    resp = client.get("/web/qr.svg")
    assert resp.status_code == 200 and resp.mimetype == "image/svg+xml"
    assert resp.headers["Cache-Control"] == "no-store"  # the link it holds opens the inbox
    expected = io.BytesIO()
    segno.make(link, error="m").save(expected, kind="svg", scale=4, border=2, dark="#172033",
                                     xmldecl=False, title=address)
    assert resp.data == expected.getvalue()
    assert b"<script" not in resp.data and b"http" not in resp.data.split(b"<path", 1)[0].replace(
        b"http://www.w3.org/2000/svg", b"")
    img = soup(client.get("/")).select_one("figure.qr img")
    assert img["src"] == "/web/qr.svg" and img["alt"]
    token = link.rsplit("/", 1)[1]
    assert app.test_client().get(f"/m/{token}/qr.svg").data == resp.data  # the token page shows the same
    assert app.test_client().get("/web/qr.svg").status_code == 404  # no session, no code


def test_extend_gives_a_full_lifetime_from_now(app_factory, clock):
    app = app_factory({"mailbox_lifetime_seconds": 3600})
    client = app.test_client()
    address = page_address(client)
    clock.advance(3000)  # 10 minutes left
    resp = client.post("/web/address/extend", data={"csrf_token": csrf(client)}, follow_redirects=True)
    assert "Your address now expires in 1 h." in resp.get_data(as_text=True)
    with app.app_context():
        box = Mailbox.find_live(address)
        assert box.expires_at == clock() + timedelta(seconds=3600)
    assert 'Extend to 1 h' in client.get("/").get_data(as_text=True)


def test_extend_never_shortens_and_needs_the_session_and_csrf(app_factory, clock):
    app = app_factory({"mailbox_lifetime_seconds": 3600})
    client = app.test_client()
    address = page_address(client)
    with app.app_context():
        box = Mailbox.find_live(address)
        box.expires_at = clock() + timedelta(days=2)  # e.g. made under a longer lifetime
        db.session.commit()
        token = box.email_token()
        before = box.expires_at
    client.post("/web/address/extend", data={"csrf_token": csrf(client)})
    assert client.post("/web/address/extend").status_code == 400  # no CSRF token
    visitor = app.test_client()
    assert visitor.post(f"/m/{token}/address/extend").status_code in (400, 404, 405)
    assert "Extend to" not in visitor.get(f"/m/{token}").get_data(as_text=True)
    with app.app_context():
        assert Mailbox.find_live(address).expires_at == before


def test_a_first_visit_is_told_what_the_page_is(client):
    intro = soup(client.get("/")).select_one(".hero .intro").get_text()
    assert "mail sent to it shows up below" in intro and "deletes itself" in intro


def test_sign_up_is_in_the_navigation_while_registration_is_open(app_factory):
    nav = soup(app_factory().test_client().get("/")).select_one("nav.main-nav")
    assert [a.get_text() for a in nav.select("a")] == ["Inbox", "API docs", "Sign in", "Sign up"]
    assert nav.select_one('a[href="/signup"]')
    closed = soup(app_factory({"registration_open": False}).test_client().get("/")).select_one("nav.main-nav")
    assert [a.get_text() for a in closed.select("a")] == ["Inbox", "API docs", "Sign in"]


def test_the_new_api_key_has_a_copy_button(app, client):
    password = "correct horse 42"
    token = TOKEN_RE.search(client.get("/signup").get_data(as_text=True)).group(1)
    client.post("/signup", data={"csrf_token": token, "email": "copy@example.org",
                                 "password": password, "confirm": password})
    token = TOKEN_RE.search(client.get("/signin").get_data(as_text=True)).group(1)
    assert client.post("/signin", data={"csrf_token": token, "email": "copy@example.org",
                                        "password": password}).status_code in (302, 303)
    token = TOKEN_RE.search(client.get("/account").get_data(as_text=True)).group(1)
    page = soup(client.post("/account/key", data={"csrf_token": token}))
    button = page.select_one(".new-key button[data-copy-text]")
    assert button["data-copy-text"] == "new-key" and page.select_one("#new-key").get_text().startswith("tm_")
    assert "hidden" in button.attrs  # shown by static/account.js; without it the key stays selectable text
    assert page.select_one('script[src="/static/account.js"]')


def test_a_stale_form_gets_a_page_in_the_visitors_language(app, client):
    page_address(client)
    client.get("/?lang=vi")
    resp = client.post("/web/address/new", data={"csrf_token": "stale"})
    assert resp.status_code == 400
    assert "Biểu mẫu này đã hết hạn. Hãy tải lại trang rồi thử lại." in resp.get_data(as_text=True)
    fetched = client.post("/web/address/new", headers={"Accept": "application/json"})
    assert fetched.status_code == 400 and fetched.json["ok"] is False
    assert client.post("/signin", data={"email": "a@example.org"}).status_code == 400
