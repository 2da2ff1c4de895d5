"""Signing in and out: the ``next`` parameter never sends a browser to another
site (checked with Chromium's own URL parser and by following the redirect in
Chromium), and a session ends on the server: a cookie captured before
sign-out, or before a password change on another browser, opens nothing.
The session tests run on SQLite and PostgreSQL."""
from __future__ import annotations

import re
import threading
from pathlib import Path
from urllib.parse import quote

import pytest
from werkzeug.security import generate_password_hash
from werkzeug.serving import make_server

from models import User, db

from .helpers import record

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
EMAIL, PASSWORD = "victim@users.test", "correct horse battery"
TOKEN_RE = re.compile(r'name="csrf_token" value="([^"]+)"')

# What an attacker puts into /signin?next=... to bounce a victim to their own
# site after a successful sign-in, or to break the redirect (header injection).
HOSTILE_NEXT = [
    "/\t/evil.example", "/\n/evil.example", "/\r/evil.example", "\t//evil.example", "/\t\t/evil.example",
    "/\r\nSet-Cookie: pwned=1", "/ok\r\nLocation: https://evil.example/", "/\x00/evil.example",
    "/\x0b/evil.example", "/\x1b/evil.example", "/\x7f/evil.example", "/\x85/evil.example",
    "/\u2028/evil.example", "//evil.example", "///evil.example", "////evil.example/x",
    "/\\evil.example", "\\/evil.example", "\\\\evil.example", "/\\/evil.example", "/./\\evil.example",
    "/%2F%2Fevil.example", "/%2f/evil.example", "%2F%2Fevil.example", "/%5Cevil.example",
    "/%5c%5cevil.example", "/%09/evil.example", "/%0d%0aSet-Cookie:%20x=1", "/%E2%80%A8/evil.example",
    "/\uff0f\uff0fevil.example", "/\u2215\u2215evil.example", "\uff0f\uff0fevil.example",
    "/\u3002/evil.example", "javascript:alert(document.domain)", "JaVaScRiPt:alert(1)",
    " javascript:alert(1)", "\x01javascript:alert(1)", "data:text/html,<script>alert(1)</script>",
    "vbscript:msgbox(1)", "https://evil.example/", "http:evil.example", "https:/evil.example",
    "https:\\\\evil.example", "http://localhost@evil.example/", "ftp://evil.example/",
    "evil.example", "..//evil.example", " /account", "/" + "a" * 5000, "",
]
# Same-site paths keep working (a safe_next that always answered /account would pass the rest).
BENIGN_NEXT = {"/docs": "/docs", "/docs?lang=it#user": "/docs?lang=it#user", "/account": "/account"}
# The subset followed end to end in Chromium, as a victim clicking the attacker's link would.
BROWSER_NEXT = ["/\t/evil.example", "/\n/evil.example", "/\t\t/evil.example", "//evil.example",
                "/\\evil.example", "/%2F%2Fevil.example", "/\uff0f\uff0fevil.example",
                "javascript:alert(1)", "https://evil.example/", "/\r\nSet-Cookie: pwned=1"]


def make_user(app, email: str = EMAIL, password: str = PASSWORD) -> None:
    """A user whose hash is cheap to check (these tests sign in many times)."""
    with app.app_context():
        user = User.create(email)
        user.password_hash = generate_password_hash(password, "pbkdf2:sha256:1000")
        db.session.commit()


def csrf(client, path: str) -> str:
    match = TOKEN_RE.search(client.get(path).get_data(as_text=True))
    assert match, f"no csrf_token on {path}"
    return match.group(1)


def sign_in(client, email: str = EMAIL, password: str = PASSWORD, **extra):
    return client.post("/signin", data={"csrf_token": csrf(client, "/signin"), "email": email,
                                        "password": password, **extra})


def sign_out(client):
    return client.post("/signout", data={"csrf_token": csrf(client, "/account")})


def plain_same_site_path(location: str) -> bool:
    """The redirect target is a printable-ASCII path on this site: no scheme,
    no host, nothing a browser could turn into ``//host``."""
    return (re.fullmatch(r"/[!-~]*", location) is not None and not location.startswith(("//", "/\\"))
            and "\\" not in location)


def resolve_in_chromium(page, base: str, locations: list[str]) -> list[str]:
    """How Chromium's URL parser resolves each ``Location`` against the sign-in page."""
    return page.evaluate("([base, locs]) => locs.map(l => new URL(l, base + '/signin').origin)",
                         [base, locations])


def serve(app):
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_port}"


def follow_in_browser(page, base: str, target: str, error: type) -> str:
    """Open the attacker's link, sign in, and return where the browser ends up
    (a navigation to another host is aborted by the page's route, and noted)."""
    page.goto(f"{base}/signin?next={quote(target, safe='')}", wait_until="load")
    page.get_by_label("E-mail address").fill(EMAIL)
    page.get_by_label("Password").fill(PASSWORD)
    try:
        with page.expect_navigation(wait_until="commit"):
            page.get_by_role("button", name="Sign in").click()
    except error as exc:
        return f"navigation aborted: {str(exc).splitlines()[0]}"
    return page.url


def test_next_never_leaves_the_site(app_factory):
    sync_api = pytest.importorskip("playwright.sync_api")
    assert Path(CHROMIUM).exists(), "run make system-deps (Debian package chromium)"
    app = app_factory(PROPAGATE_EXCEPTIONS=False)  # an error is a 500 answer, as in production
    make_user(app)
    answers = {}
    for target in HOSTILE_NEXT + list(BENIGN_NEXT):
        client = app.test_client()
        resp = sign_in(client, next=target)
        answers[target] = (resp.status_code, resp.headers.get("Location", ""))
    statuses = sorted({status for status, _ in answers.values()})
    unsafe = {t: loc for t, (_, loc) in answers.items() if not plain_same_site_path(loc)}
    server, base = serve(app)
    off_site = []
    try:
        with sync_api.sync_playwright() as pw:
            # no host name resolves: a redirect off-site fails in the browser instead of leaving the machine
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + [
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"])
            page = browser.new_context().new_page()
            page.set_default_timeout(15000)
            # every request, redirects included (page.route sees only a chain's first URL)
            page.on("request", lambda req: None if req.url.startswith(base) else off_site.append(req.url))
            page.goto(base + "/signin")
            origins = resolve_in_chromium(page, base, [loc for _, loc in answers.values()])
            landed = {}
            for target in BROWSER_NEXT:
                page.context.clear_cookies()
                landed[target] = follow_in_browser(page, base, target, sync_api.Error)
            browser.close()
    finally:
        server.shutdown()
    foreign = [t for t, origin in zip(answers, origins) if origin != base]
    strayed = {t: url for t, url in landed.items() if not url.startswith(base + "/")}
    record("sign-in", f"{len(HOSTILE_NEXT)} hostile next values (tabs, CR/LF, C0/C1, //, /\\, %2F, unicode "
           f"slashes, javascript:, absolute URLs): answers {statuses}, {len(unsafe)} not a plain same-site "
           f"path, {len(foreign)} resolved off-site by Chromium; {len(BROWSER_NEXT)} followed in Chromium: "
           f"{len(strayed)} left the site, {len(off_site)} requests to other hosts")
    assert unsafe == {} and foreign == [] and strayed == {} and off_site == [], (unsafe, strayed, off_site)
    for target, expected in BENIGN_NEXT.items():
        assert answers[target][1] == expected, target
    assert statuses == [302], {t: a for t, a in answers.items() if a[0] != 302}
    assert all(answers[t][1] == "/account" for t in HOSTILE_NEXT)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_a_captured_cookie_dies_with_sign_out(app, backend):
    make_user(app)
    victim, other_device = app.test_client(), app.test_client()
    assert sign_in(victim).status_code == 302 and sign_in(other_device).status_code == 302
    captured = victim.get_cookie("session").value
    assert sign_out(victim).status_code == 302
    thief = app.test_client()
    thief.set_cookie("session", captured)
    replay = thief.get("/account")
    still_in = other_device.get("/account").status_code
    record("sign-in", f"{backend}: a session cookie captured before /signout, replayed afterwards -> "
           f"{replay.status_code} to {replay.headers.get('Location')}; the same user's other browser -> {still_in}")
    assert replay.status_code == 302 and replay.headers["Location"].startswith("/signin")
    assert victim.get("/account").status_code == 302
    assert still_in == 200  # sign-out ends this session, not the user's others


def change_password(client, current: str, new: str, confirm: str | None = None):
    return client.post("/account/password", data={
        "csrf_token": csrf(client, "/account"), "current_password": current, "new_password": new,
        "confirm": new if confirm is None else confirm})


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_a_password_change_ends_every_other_session(app, backend):
    make_user(app)
    changer, laptop, phone = app.test_client(), app.test_client(), app.test_client()
    for client in (changer, laptop, phone):
        assert sign_in(client).status_code == 302
    before_change = changer.get_cookie("session").value
    refused = [change_password(changer, "wrong password", "new secret 2027").status_code,
               change_password(changer, PASSWORD, "short").status_code,
               change_password(changer, PASSWORD, "new secret 2027", "other secret 2027").status_code,
               changer.post("/account/password", data={"current_password": PASSWORD,
                                                        "new_password": "x" * 12, "confirm": "x" * 12}).status_code]
    assert [c.get("/account").status_code for c in (changer, laptop, phone)] == [200, 200, 200]
    done = change_password(changer, PASSWORD, "new secret 2027")
    after = {"changer": changer.get("/account").status_code, "laptop": laptop.get("/account").status_code,
             "phone": phone.get("/account").status_code}
    thief = app.test_client()
    thief.set_cookie("session", before_change)
    after["changer's cookie from before"] = thief.get("/account").status_code
    old_pw, new_pw = sign_in(app.test_client()).status_code, \
        sign_in(app.test_client(), password="new secret 2027").status_code
    record("sign-in", f"{backend}: password change (wrong current / too short / mismatch / no CSRF -> "
           f"{refused}) -> {done.status_code}; then /account: {after}; sign-in with the old password "
           f"{old_pw}, the new {new_pw}")
    assert refused == [400, 400, 400, 400]
    assert done.status_code == 303
    assert after == {"changer": 200, "laptop": 302, "phone": 302, "changer's cookie from before": 302}
    assert old_pw == 401 and new_pw == 302
