"""The API docs in headless Chromium: each language renders under the site's
strict CSP without errors or outside requests, and the sample tabs work."""
from __future__ import annotations

HEADINGS = {"en": "API documentation", "it": "Documentazione API", "vi": "Tài liệu API",
            "tr": "API belgeleri"}


def watch(page, base: str) -> list:
    """Collect console errors, failed responses and requests leaving this server."""
    problems = []
    page.on("console", lambda m: problems.append(f"console: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"js: {e}"))
    page.on("request", lambda r: problems.append(f"outside: {r.url}")
            if not r.url.startswith((base, "data:")) else None)
    page.on("response", lambda r: problems.append(f"{r.status}: {r.url}")
            if r.status >= 400 and not r.url.endswith("/favicon.ico") else None)
    return problems


def test_docs_render_in_each_language(live_server, page):
    base = live_server.url
    problems = watch(page, base)
    for lang, heading in HEADINGS.items():
        page.goto(f"{base}/docs?lang={lang}")
        assert page.locator("html").get_attribute("lang") == lang
        assert page.get_by_role("heading", level=1).inner_text() == heading
        assert page.locator(f'.lang-switch a[aria-current="page"][hreflang="{lang}"]').count() == 1
        assert base + "/api/emails" in page.locator("#user-create pre").first.inner_text()
    assert problems == []


def test_language_switch_and_sample_tabs(live_server, page):
    base = live_server.url
    problems = watch(page, base)
    page.goto(base + "/docs")
    page.locator(".lang-switch").get_by_role("link", name="Türkçe").click()
    page.wait_for_url(base + "/docs?lang=tr")
    assert page.get_by_role("heading", level=1).inner_text() == "API belgeleri"

    block = page.locator("#user-create")
    assert block.locator('[data-panel="curl"]').is_visible()
    assert not block.locator('[data-panel="python"]').is_visible()
    block.get_by_role("tab", name="Python").click()
    assert block.locator('[data-panel="python"]').is_visible()
    assert not block.locator('[data-panel="curl"]').is_visible()
    # one choice for the whole page, kept across visits
    assert page.locator('#legacy-stats [data-panel="python"]').is_visible()
    page.reload()
    assert page.locator('#user-messages [data-panel="python"]').is_visible()
    # arrow keys move between tabs
    tab = page.locator("#user-messages").get_by_role("tab", name="Python")
    tab.focus()
    page.keyboard.press("ArrowRight")
    assert page.locator('#user-messages [data-panel="php"]').is_visible()
    assert problems == []


def test_docs_without_javascript_show_every_sample(browser, live_server):
    context = browser.new_context(java_script_enabled=False)
    try:
        page = context.new_page()
        page.goto(live_server.url + "/docs?lang=vi")
        panels = page.locator("#user-create [data-panel]")
        assert panels.count() == 4
        assert all(panels.nth(i).is_visible() for i in range(4))
    finally:
        context.close()
