"""The inbox page in Chromium hears of new mail through its Server-Sent
Events stream (``/web/stream``), not by polling, against gunicorn as
``make run`` serves it and the real mail daemon; where the stream is
refused it falls back to polling ``inbox.json``."""
from __future__ import annotations

import smtplib
import time
from email.message import EmailMessage
from urllib.parse import urlsplit

import pytest

from adversarial.helpers import Daemon, Gunicorn, write_config

WAIT_MS = 10000


@pytest.fixture
def served(app, tmp_path):
    """The daemon and gunicorn (deploy/gunicorn.conf.py, 2 workers) on the test's database."""
    config = write_config(app, tmp_path / "config.json")
    daemon = Daemon(config, tmp_path / "smtpd.log").start()
    web = Gunicorn(config, tmp_path / "gunicorn.log", workers=2,
                   extra=["--config", "deploy/gunicorn.conf.py"]).start()
    yield web, daemon
    web.stop()
    daemon.stop()


def send(port: int, to: str, subject: str) -> None:
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = "Shop Team <hello@shop.example>", to, subject
    mail.set_content("Your code is 123456.\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        assert smtp.send_message(mail) == {}


def watch(page) -> list[str]:
    """The path of every request the page makes, in order."""
    paths: list[str] = []
    page.on("request", lambda req: paths.append(urlsplit(req.url).path))
    return paths


def test_new_mail_arrives_through_the_stream_without_polling(served, page):
    web, daemon = served
    paths = watch(page)
    streams = []
    page.on("response", lambda resp: streams.append(resp.headers.get("content-type", ""))
            if urlsplit(resp.url).path == "/web/stream" else None)
    page.goto(web.url + "/")
    page.wait_for_selector("#live-status.on")
    address = page.input_value("#address")

    send(daemon.port, address, "Welcome through the stream")
    row = page.wait_for_selector("#message-list li.msg.unread", timeout=WAIT_MS)
    assert "Welcome through the stream" in row.inner_text() and "Shop Team" in row.inner_text()
    send(daemon.port, address, "Second one")
    page.wait_for_selector("#message-list li.msg:has-text('Second one')", timeout=WAIT_MS)
    assert page.inner_text("#count") == "2" and page.is_hidden("#empty")
    assert page.title().startswith("(2) ")
    time.sleep(2.5)  # longer than the old polling interval: a poller would have asked by now

    assert paths.count("/web/stream") == 1, paths
    assert not [p for p in paths if p.endswith("/inbox.json")], paths
    assert streams and streams[0].startswith("text/event-stream")


def test_page_falls_back_to_polling_where_the_stream_is_refused(served, page):
    web, daemon = served
    paths = watch(page)
    # A proxy that refuses the stream: EventSource gives up, the page polls.
    page.route("**/web/stream*", lambda route: route.fulfill(status=503, body="stream refused"))
    page.goto(web.url + "/")
    address = page.input_value("#address")
    page.wait_for_selector("#live-status.on", timeout=WAIT_MS)
    send(daemon.port, address, "Found by polling")
    row = page.wait_for_selector("#message-list li.msg.unread", timeout=WAIT_MS)
    assert "Found by polling" in row.inner_text()
    assert "/web/stream" in paths and "/web/inbox.json" in paths
