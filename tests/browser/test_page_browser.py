"""Issue 15's page work in headless Chromium, each with a screenshot kept in
test-artifacts/screenshots/ for a person to look at: the pages in Italian and
Turkish with the language menu, a steady "Change address", the reader's frame
sized to the mail, colours and files in the reader, the source view, search
and paging of a long inbox, the QR code, "extend", and the API key's Copy."""
from __future__ import annotations

import mailhandler
from models import Mailbox, db

from .conftest import MOBILE, SCREENSHOTS, new_page
from .test_web_browser import PNG, WAIT_MS, open_inbox, send

PASSWORD = "browser pass 123"


def snap(page, name: str) -> None:
    """Keep a full-page screenshot whatever the outcome: the layout is checked by eye too."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def until(page, check, tries: int = 100):
    """Poll ``check`` (a page.evaluate is allowed under the site's CSP, where
    wait_for_function is not) until it gives something truthy."""
    for _ in range(tries):
        result = check()
        if result:
            return result
        page.wait_for_timeout(100)
    raise AssertionError("condition not met")


def problems_of(page, base: str) -> list:
    """Console errors, failed responses and requests leaving this server."""
    problems = []
    page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"js: {e}"))
    page.on("request", lambda r: problems.append(f"outside: {r.url}")
            if not r.url.startswith((base, "data:", "about:")) else None)
    return problems


# --------------------------------------------------------------------------
# languages

def test_inbox_in_italian_through_the_language_menu(page, live_server, smtp_server):
    base = live_server.url
    problems = problems_of(page, base)
    address = open_inbox(page, live_server)
    assert page.locator("html").get_attribute("lang") == "en"
    page.click("details.lang-menu > summary")
    page.get_by_role("link", name="Italiano").click()
    page.wait_for_selector('html[lang="it"]')
    page.wait_for_selector("#live-status.on")
    assert page.get_by_role("heading", level=1).inner_text() == "Il tuo indirizzo e-mail temporaneo"
    assert page.locator("#live-status .live-text").inner_text() == "In diretta"  # the script's words too
    send(smtp_server, address, "Conferma la registrazione", "Ciao! https://shop.example/c/1",
         html='<p>Ciao, <b>benvenuto</b>.</p><p><a href="https://shop.example/c/1" style="background:#1a73e8 '
              'url(https://shop.example/b.png);color:#fff;padding:10px 18px;display:inline-block">Conferma</a></p>',
         attachments=[("ricevuta.pdf", b"%PDF" + b"0" * 1200)])
    send(smtp_server, address, "Il tuo codice: 4821", "Codice 4821")
    page.wait_for_selector("#message-list li:nth-child(2)", timeout=WAIT_MS)
    page.click("#message-list li:nth-child(2) a")
    page.wait_for_selector("#reader iframe.mail-frame.fitted")
    reader = page.locator("#reader").inner_text()
    for word in ("Da", "Scarica .eml", "Elimina", "Testo semplice", "Intestazioni e sorgente", "Allegati"):
        assert word in reader, word
    assert page.locator(".att-size").inner_text() == "1,2 KB"
    snap(page, "inbox-it-1280")

    page.reload()  # the choice is remembered
    page.wait_for_selector('html[lang="it"]')
    page.get_by_role("link", name="Documentazione API").first.click()
    page.wait_for_url(base + "/docs")
    assert page.locator("html").get_attribute("lang") == "it"
    assert page.get_by_role("heading", level=1).inner_text() == "Documentazione API"
    assert page.locator("nav.main-nav").inner_text().split() == ["Posta", "in", "arrivo", "Documentazione",
                                                                 "API", "Accedi", "Registrati"]
    assert problems == []


def test_a_turkish_browser_gets_turkish_pages_on_a_phone(browser, request, live_server):
    page = new_page(browser, request, viewport=MOBILE, is_mobile=True, has_touch=True, locale="tr-TR")
    open_inbox(page, live_server)
    assert page.locator("html").get_attribute("lang") == "tr"
    assert page.get_by_role("button", name="Kopyala").is_visible()
    assert page.locator(".hero .intro").inner_text().startswith("Kendi adresinizi vermek istemediğiniz")
    assert page.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
    assert not page.locator("figure.qr").is_visible()  # the code is for moving from a computer to a phone
    snap(page, "inbox-tr-390")


# --------------------------------------------------------------------------
# the inbox

def button_boxes(page) -> list:
    return [page.locator(sel).bounding_box() for sel in
            ("button:has-text('New random address')", "details.change > summary",
             "button:has-text('Delete address')")]


def test_opening_change_address_moves_no_button(page, mobile_page, live_server):
    for view, name in ((page, "change-address-open-1280"), (mobile_page, "change-address-open-390")):
        open_inbox(view, live_server)
        before = button_boxes(view)
        view.click("details.change > summary")
        view.get_by_label("Username").wait_for()
        assert button_boxes(view) == before
        assert view.get_by_role("button", name="Save").is_visible()
        if view is page:  # on a desktop the three stay on one line
            assert len({round(box["y"]) for box in before}) == 1
        assert view.evaluate("document.documentElement.scrollWidth - window.innerWidth") <= 0
        snap(view, name)


def fill(app, address: str, count: int) -> None:
    with app.app_context():
        box = Mailbox.find_live(address)
        for i in range(count):
            mailhandler.store_message(box, {"from_email": f"s{i % 3}@shop.example", "from_name": f"Shop {i % 3}",
                                       "subject": f"Order {i:03d}", "body_text": "x", "body_html": ""},
                                 b"Subject: x\r\n\r\nx", ())
        db.session.commit()


def subjects(page) -> list[str]:
    return [s.replace("Unread:", "").strip() for s in page.locator("#message-list .subject").all_inner_texts()]


def test_search_and_paging_without_reloading(page, live_server, app):
    address = open_inbox(page, live_server)
    fill(app, address, 55)
    page.evaluate("window.__sameDocument = true")
    # The page follows the mail as it is stored: it may show 50 of the first
    # 50 before the last five arrive; the state to check is the final one.
    page.wait_for_selector("#count:text-is('55')", timeout=WAIT_MS)
    page.wait_for_selector("#message-list li:nth-child(50)", timeout=WAIT_MS)
    assert page.inner_text("#count") == "55" and page.inner_text("#pager-range") == "1–50 of 55"
    assert not page.is_visible("#pager-newer")
    page.click("#pager-older")
    page.wait_for_selector("#message-list li:nth-child(5):last-child", timeout=WAIT_MS)
    assert subjects(page) == [f"Order {i:03d}" for i in range(4, -1, -1)]
    assert page.url.endswith("/?page=2") and page.inner_text("#pager-range") == "51–55 of 55"
    page.fill("#search", "shop 2")
    page.wait_for_selector("#count:text-is('18')", timeout=WAIT_MS)
    assert subjects(page)[0] == "Order 053" and len(subjects(page)) == 18
    assert page.is_hidden("#pager") and page.url.endswith("/?q=shop+2")
    snap(page, "inbox-search-1280")
    page.fill("#search", "no such order")
    page.wait_for_selector("#no-match:not([hidden])", timeout=WAIT_MS)
    assert page.is_hidden("#empty") and subjects(page) == []
    page.fill("#search", "")
    page.wait_for_selector("#message-list li:nth-child(50)", timeout=WAIT_MS)
    assert page.evaluate("window.__sameDocument") is True


def test_qr_code_and_extend(page, live_server, app, clock):
    address = open_inbox(page, live_server)
    qr = page.locator("figure.qr img")
    assert qr.evaluate("img => img.complete && img.naturalWidth") > 100
    assert page.locator("figure.qr figcaption").inner_text() == "Scan to open this inbox on your phone."
    clock.advance(5 * 3600)
    page.reload()
    assert page.inner_text("#expires").startswith("19:")
    page.get_by_role("button", name="Extend to 24 h").click()
    page.wait_for_selector(".flash-ok")
    assert page.inner_text(".flash-ok") == "Your address now expires in 24 h."
    assert page.inner_text("#expires").startswith("24:00") or page.inner_text("#expires").startswith("23:59")
    with app.app_context():
        box = Mailbox.find_live(address)
        assert (box.expires_at - clock()).total_seconds() == 86400
    snap(page, "inbox-qr-extend-1280")


# --------------------------------------------------------------------------
# the reader

def frame_state(page) -> dict:
    return page.evaluate("""() => { const f = document.querySelector('#reader iframe.mail-frame');
        const d = f.contentDocument.documentElement;
        return {height: f.getBoundingClientRect().height, inner: d.scrollHeight, view: d.clientHeight}; }""")


def test_the_frame_is_as_tall_as_the_mail(page, live_server, smtp_server):
    address = open_inbox(page, live_server)
    send(smtp_server, address, "Short", "Hi", html="<p>Just one line.</p>")
    long_html = "".join(f"<p>Paragraph {i} of a long newsletter, with enough words to wrap.</p>" for i in range(120))
    send(smtp_server, address, "Long", "Long", html=long_html)
    page.wait_for_selector("#message-list li:nth-child(2)", timeout=WAIT_MS)

    page.click("#message-list li:has-text('Short') a")
    page.wait_for_selector("#reader iframe.mail-frame.fitted")
    short = frame_state(page)
    assert 40 < short["height"] < 120, short  # no empty block under a one-line mail
    assert short["inner"] <= short["view"], short  # and nothing hidden in it
    snap(page, "reader-short-1280")

    page.click("#message-list li:has-text('Long') a")
    page.wait_for_selector("#reader .msg-subject:text-is('Long')")
    page.wait_for_selector("#reader iframe.mail-frame.fitted")
    tall = frame_state(page)
    assert tall["height"] > 3000 and tall["inner"] <= tall["view"], tall  # the page scrolls, not the frame
    frame = page.frame_locator("#reader iframe.mail-frame")
    assert "Paragraph 119" in frame.locator("body").inner_text()

    page.set_viewport_size({"width": 900, "height": 900})  # narrower: the text wraps more, the frame follows
    narrow = until(page, lambda: frame_state(page)["height"] > tall["height"] and frame_state(page))
    assert narrow["height"] > tall["height"] and narrow["inner"] <= narrow["view"], (tall, narrow)


def test_reader_colours_files_and_source(page, live_server, smtp_server):
    address = open_inbox(page, live_server)
    html = ('<p>Please confirm.</p>'
            '<p><a href="https://shop.example/c" style="background:#1a73e8 url(https://shop.example/b.png);'
            'color:#ffffff;padding:10px 18px;display:inline-block">Confirm</a></p>'
            '<table><tr><td style="background-image:url(https://shop.example/bg.png);color:#fff">'
            'Read me</td></tr></table><p><img src="cid:logo@shop" alt="logo"></p>')
    send(smtp_server, address, "Colours", "Please confirm.", html=html,
         attachments=[("receipt.bin", b"r" * 157)], related=[(PNG, "logo@shop")])
    page.wait_for_selector("#message-list li", timeout=WAIT_MS).query_selector("a").click()
    page.wait_for_selector("#reader iframe.mail-frame.fitted")
    frame = page.frame_locator("#reader iframe.mail-frame")
    button = frame.locator("a", has_text="Confirm").evaluate("a => [getComputedStyle(a).backgroundColor, getComputedStyle(a).color]")
    assert button == ["rgb(26, 115, 232)", "rgb(255, 255, 255)"]  # the button stays visible
    cell = frame.locator("td", has_text="Read me").evaluate("td => getComputedStyle(td).color")
    assert cell != "rgb(255, 255, 255)"  # white on a dropped image would be white on white
    frame.locator("img[alt=logo]").wait_for()
    assert page.locator("#reader .attachments li .att-name").all_inner_texts() == ["receipt.bin"]
    assert page.locator("#reader .attachments li .att-size").all_inner_texts() == ["157 B"]
    snap(page, "reader-colours-1280")

    page.click("#reader a:has-text('Headers and source')")
    page.wait_for_selector("#reader pre.raw-headers")
    headers = page.inner_text("#reader pre.raw-headers")
    assert "Subject: Colours" in headers and "From: Shop Team <hello@shop.example>" in headers
    page.click("#reader details.raw-full > summary")
    assert "Content-ID: <logo@shop>" in page.inner_text("#reader details.raw-full pre")
    snap(page, "reader-source-1280")


# --------------------------------------------------------------------------
# accounts

def test_sign_up_from_the_navigation_and_copy_the_new_key(browser, request, live_server):
    base = live_server.url
    page = new_page(browser, request)
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    page.goto(base + "/")
    page.locator("nav.main-nav").get_by_role("link", name="Sign up").click()
    page.wait_for_url(base + "/signup")
    page.get_by_label("E-mail address").fill("copy@example.org")
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Repeat the password").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    page.wait_for_url(base + "/signin")
    page.get_by_label("Password").fill(PASSWORD)
    page.locator("main").get_by_role("button", name="Sign in").click()
    page.wait_for_url(base + "/account")
    page.get_by_role("button", name="Create API key").click()
    key = page.get_by_test_id("new-key").inner_text().strip()
    copy = page.locator(".new-key").get_by_role("button", name="Copy")
    copy.click()
    page.locator(".new-key button:has-text('Copied!')").wait_for()
    assert page.evaluate("navigator.clipboard.readText()") == key
    snap(page, "api-key-copy-1280")
