"""Browser-test plumbing: one headless Chromium per module, a live werkzeug
server per test on a free port, an in-process SMTP receiver, and a screenshot
of the page in ``test-artifacts/screenshots/`` whenever a test fails.

Playwright cannot download its own browser here: Debian's ``chromium``
(installed by ``make system-deps``) is driven instead. Browser tests run on
SQLite only; the test-client tests cover PostgreSQL.
"""
from __future__ import annotations

import threading
from pathlib import Path

import pytest
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOTS = ROOT / "test-artifacts" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DESKTOP = {"width": 1280, "height": 900}
MOBILE = {"width": 390, "height": 844}


@pytest.fixture(params=["sqlite"])
def backend(request):
    """Browser tests exercise the page, not the database: SQLite only."""
    return request.param


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember each phase's report on the item so fixtures can see failures."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make system-deps` (Debian package chromium)")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


class LiveServer:
    """The test's app served by werkzeug in a thread on a free port."""

    def __init__(self, app):
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.thread.join(timeout=10)


@pytest.fixture
def live_server(app):
    server = LiveServer(app)
    yield server
    server.stop()


@pytest.fixture
def smtp_server(app):
    """The real mail daemon (Salmon receiver) in-process on a free port."""
    from smtpserver import MailServer
    server = MailServer(app, "127.0.0.1", 0, purge=False).start()
    yield server
    server.stop()


def new_page(browser, request, viewport=DESKTOP, **options):
    """A fresh context and page whose screenshot is kept when the test fails."""
    context = browser.new_context(viewport=viewport, accept_downloads=True, **options)
    page = context.new_page()
    page.set_default_timeout(15000)

    def finish():
        failed = any(getattr(getattr(request.node, f"report_{when}", None), "failed", False)
                     for when in ("setup", "call"))
        if failed:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            name = request.node.name.replace("/", "_").replace("[", "-").rstrip("]")
            try:
                page.screenshot(path=str(SCREENSHOTS / f"{name}-{viewport['width']}.png"), full_page=True)
            except Exception:  # a crashed page must not hide the real failure
                pass
        context.close()
    request.addfinalizer(finish)
    return page


@pytest.fixture
def page(browser, request):
    return new_page(browser, request)


@pytest.fixture
def mobile_page(browser, request):
    return new_page(browser, request, viewport=MOBILE, is_mobile=True, has_touch=True)
