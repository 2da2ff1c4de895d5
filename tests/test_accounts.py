"""Sign up, sign in, sign out and API Management through the Flask test client,
on SQLite and PostgreSQL, with CSRF protection switched on as in production."""
from __future__ import annotations

import re

import pytest
from werkzeug.security import generate_password_hash

from models import ApiKey, QuotaUsage, User, db
import limits  # noqa: E402
import clock  # noqa: E402

PASSWORD = "correct horse 42"
TOKEN_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf(client, path: str) -> str:
    """The CSRF token of the form on ``path`` (the session cookie stays in the client)."""
    page = client.get(path)
    match = TOKEN_RE.search(page.get_data(as_text=True))
    assert match, f"no csrf_token in {path} ({page.status_code})"
    return match.group(1)


def post_form(client, path: str, data: dict, form_page: str | None = None):
    return client.post(path, data={"csrf_token": csrf(client, form_page or path), **data})


def sign_up(client, email="dev@example.org", password=PASSWORD, confirm=None):
    return post_form(client, "/signup", {"email": email, "password": password,
                                         "confirm": password if confirm is None else confirm})


def sign_in(client, email="dev@example.org", password=PASSWORD, **extra):
    return post_form(client, "/signin", {"email": email, "password": password, **extra})


def make_user(app, email="dev@example.org", password=PASSWORD, plan="free") -> int:
    """A user whose hash is cheap to check (sign-ins are many here; scrypt is
    exercised by the sign-up tests and by the CLI user)."""
    with app.app_context():
        user = User.create(email, plan=plan)
        user.password_hash = generate_password_hash(password, "pbkdf2:sha256:1000")
        db.session.commit()
        return user.id


def new_key_from(page: str) -> str:
    match = re.search(r'data-testid="new-key">([^<]+)<', page)
    assert match, "the new key is not on the page"
    return match.group(1)


# --------------------------------------------------------------------------
# sign up

def test_signup_creates_a_hashed_account_then_asks_to_sign_in(app, client):
    resp = sign_up(client, email="New.User@Example.org")
    assert resp.status_code == 303 and resp.headers["Location"] == "/signin"
    with app.app_context():
        user = User.by_email("new.user@example.org")
        assert user is not None and user.plan == "free"
        assert PASSWORD not in (user.password_hash or "") and user.check_password(PASSWORD)
    signin_page = client.get("/signin").get_data(as_text=True)
    assert "sign in with the password you chose" in signin_page
    assert 'value="new.user@example.org"' in signin_page  # the address is filled in
    assert client.get("/account").status_code == 302
    assert sign_in(client, email="new.user@example.org").status_code == 302
    page = client.get("/account")
    assert page.status_code == 200 and "new.user@example.org" in page.get_data(as_text=True)


@pytest.mark.parametrize("email,password,confirm,message", [
    ("not-an-address", PASSWORD, PASSWORD, "valid e-mail"),
    ("a@example.org", "short", "short", "8 to 200"),
    ("a@example.org", PASSWORD, PASSWORD + "x", "do not match"),
])
def test_signup_rejects_bad_input(app, client, email, password, confirm, message):
    resp = sign_up(client, email=email, password=password, confirm=confirm)
    assert resp.status_code == 400 and message in resp.get_data(as_text=True)
    with app.app_context():
        assert db.session.query(User).count() == 0


def test_signup_with_a_taken_email_changes_nothing_and_says_nothing(app, client):
    make_user(app)
    resp = sign_up(client, email="DEV@example.org", password="attacker's password")
    assert resp.status_code == 303 and resp.headers["Location"] == "/signin"
    assert "sign in with the password you chose" in client.get("/signin").get_data(as_text=True)
    with app.app_context():
        assert db.session.query(User).count() == 1
        assert User.by_email("dev@example.org").check_password(PASSWORD)
    assert client.get("/account").status_code == 302


def test_signups_are_limited_per_ip(app_factory):
    client = app_factory({"rate_limits": {"signup": {"limit": 2, "window_seconds": 3600}}}).test_client()
    codes = [sign_up(client, email=f"u{n}@example.org").status_code for n in range(3)]
    assert codes == [303, 303, 429]


def test_registration_closed(app_factory):
    client = app_factory({"registration_open": False}).test_client()
    assert client.get("/signup").status_code == 403
    assert client.post("/signup", data={"email": "a@example.org"}).status_code in (400, 403)
    assert "Create one" not in client.get("/signin").get_data(as_text=True)


def test_every_form_needs_the_csrf_token(app, client):
    make_user(app)
    for path in ("/signup", "/signin"):
        resp = client.post(path, data={"email": "dev@example.org", "password": PASSWORD, "confirm": PASSWORD})
        assert resp.status_code == 400, path
    assert sign_in(client).status_code == 302
    for path in ("/account/key", "/account/key/revoke", "/account/password", "/signout"):
        assert client.post(path).status_code == 400, path
        assert client.post(path, data={"csrf_token": "forged"}).status_code == 400, path
    with app.app_context():
        assert db.session.query(ApiKey).count() == 0


# --------------------------------------------------------------------------
# sign in, rate limit, sign out

def test_sign_in_and_out(app, client):
    make_user(app)
    assert client.get("/account").status_code == 302
    resp = sign_in(client, email=" Dev@Example.org ")
    assert resp.status_code == 302 and resp.headers["Location"].endswith("/account")
    assert "API Management" in client.get("/account").get_data(as_text=True)
    resp = post_form(client, "/signout", {}, form_page="/account")
    assert resp.status_code == 302
    assert client.get("/account").status_code == 302


def test_wrong_password_and_unknown_user(app, client):
    make_user(app)
    for email, password in (("dev@example.org", "wrong password"), ("nobody@example.org", PASSWORD)):
        resp = sign_in(client, email=email, password=password)
        assert resp.status_code == 401 and "Wrong e-mail address or password" in resp.get_data(as_text=True)
    assert client.get("/account").status_code == 302


def test_user_without_password_cannot_sign_in(app, client):
    with app.app_context():
        User.create("keyonly@example.org")
        db.session.commit()
    assert sign_in(client, email="keyonly@example.org", password="").status_code == 401


def test_failed_logins_are_rate_limited_per_ip_and_email(app, client, clock):
    make_user(app)
    for _ in range(10):
        assert sign_in(client, password="guess").status_code == 401
    blocked = sign_in(client)  # even the right password, while the window lasts
    assert blocked.status_code == 429 and "Too many failed attempts" in blocked.get_data(as_text=True)
    assert client.get("/account").status_code == 302
    make_user(app, email="other@example.org")
    assert sign_in(client, email="other@example.org").status_code == 302  # other accounts unaffected
    clock.advance(15 * 60)
    assert sign_in(client).status_code == 302


def test_next_parameter_stays_on_this_site(app, client):
    make_user(app)
    for target, expected in (("/docs", "/docs"), ("https://evil.example/", "/account"),
                             ("//evil.example/", "/account")):
        client.post("/signout", data={"csrf_token": csrf(client, "/signin")})
        resp = sign_in(client, next=target)
        assert resp.headers["Location"].endswith(expected), target
        assert "evil" not in resp.headers["Location"]


def test_password_set_elsewhere_ends_every_session(app, client):
    user_id = make_user(app)
    sign_in(client)
    with app.app_context():
        db.session.get(User, user_id).set_password("another password")
        db.session.commit()
    assert client.get("/account").status_code == 302


def test_password_change_form(app, client):
    make_user(app)
    sign_in(client)
    assert 'action="/account/password"' in client.get("/account").get_data(as_text=True)
    wrong = post_form(client, "/account/password", {"current_password": "nope", "new_password": "x" * 10,
                                                    "confirm": "x" * 10}, "/account")
    assert wrong.status_code == 400 and "current password is not correct" in wrong.get_data(as_text=True)
    resp = post_form(client, "/account/password", {"current_password": PASSWORD, "new_password": "x" * 10,
                                                   "confirm": "x" * 10}, "/account")
    assert resp.status_code == 303 and resp.headers["Location"] == "/account"
    assert "Your password is changed" in client.get("/account").get_data(as_text=True)
    assert sign_in(app.test_client(), password="x" * 10).status_code == 302


def test_sessions_per_user_are_bounded(app, client):
    from accounts import MAX_SESSIONS
    from models import UserSession
    make_user(app)
    for _ in range(MAX_SESSIONS + 5):
        assert sign_in(app.test_client()).status_code == 302
    with app.app_context():
        assert db.session.query(UserSession).count() == MAX_SESSIONS


def test_session_cookie_flags(app, client):
    make_user(app)
    cookie = sign_in(client).headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie and "Secure" not in cookie
    https = app.test_client()
    resp = https.post("/signin", base_url="https://localhost", data={
        "csrf_token": TOKEN_RE.search(https.get("/signin", base_url="https://localhost").get_data(as_text=True))[1],
        "email": "dev@example.org", "password": PASSWORD}, headers={"Referer": "https://localhost/signin"})
    assert resp.status_code == 302 and "Secure" in resp.headers["Set-Cookie"]


def test_cli_created_user_can_sign_in(app, client, runner):
    result = runner.invoke(args=["users", "create", "cli@example.org", "--plan", "premium",
                                 "--password", PASSWORD])
    assert result.exit_code == 0, result.output
    assert sign_in(client, email="cli@example.org").status_code == 302
    page = client.get("/account").get_data(as_text=True)
    assert "Premium" in page and "Free, Premium" in page


@pytest.mark.parametrize("password", ["abc", "", "seven77", "x" * 201])
def test_cli_and_sign_up_form_share_one_password_rule(app, client, runner, password):
    result = runner.invoke(args=["users", "create", "cli@example.org", "--password", password])
    assert result.exit_code == 2, result.output
    rule = "Choose a password of 8 to 200 characters."
    assert "Invalid value for --password" in result.output and rule in result.output
    form = sign_up(client, email="web@example.org", password=password)
    assert form.status_code == 400 and rule in form.get_data(as_text=True)
    with app.app_context():
        assert db.session.query(User).count() == 0


def test_cli_accepts_what_the_form_accepts_and_no_password_at_all(app, runner):
    assert runner.invoke(args=["users", "create", "eight@example.org", "--password", "8 chars!"]).exit_code == 0
    assert runner.invoke(args=["users", "create", "keyonly@example.org"]).exit_code == 0
    with app.app_context():
        assert User.by_email("eight@example.org").check_password("8 chars!")
        assert User.by_email("keyonly@example.org").password_hash is None  # API keys only


# --------------------------------------------------------------------------
# API Management

def test_key_is_shown_once_then_only_its_prefix(app, client):
    make_user(app)
    sign_in(client)
    assert "Create API key" in client.get("/account").get_data(as_text=True)
    resp = post_form(client, "/account/key", {}, form_page="/account")
    assert resp.status_code == 201 and resp.headers["Cache-Control"] == "no-store"
    raw = new_key_from(resp.get_data(as_text=True))
    with app.app_context():
        key = ApiKey.lookup(raw)
        assert key is not None and key.user.email == "dev@example.org"
        prefix = key.prefix
    later = client.get("/account").get_data(as_text=True)
    assert raw not in later and f"{prefix}…" in later
    assert raw not in str(client.get_cookie("session").value)


def test_regenerate_revokes_the_old_key(app, client):
    make_user(app)
    sign_in(client)
    first = new_key_from(post_form(client, "/account/key", {}, "/account").get_data(as_text=True))
    second = new_key_from(post_form(client, "/account/key", {}, "/account").get_data(as_text=True))
    assert first != second
    with app.app_context():
        assert ApiKey.lookup(first) is None and ApiKey.lookup(second) is not None
    api = client.get("/api/domains", headers={"Authorization": f"Bearer {first}"})
    assert api.status_code == 401
    assert client.get("/api/domains", headers={"Authorization": f"Bearer {second}"}).status_code == 200


def test_revoke_key(app, client):
    make_user(app)
    sign_in(client)
    raw = new_key_from(post_form(client, "/account/key", {}, "/account").get_data(as_text=True))
    resp = post_form(client, "/account/key/revoke", {}, "/account")
    assert resp.status_code == 302
    with app.app_context():
        assert ApiKey.lookup(raw) is None
    assert "You have no active key" in client.get("/account").get_data(as_text=True)


def test_management_page_shows_plan_quota_and_base_url(app):
    user_id = make_user(app)
    with app.app_context():
        db.session.add(QuotaUsage(user_id=user_id, period=limits.quota_period(), used=1234))
        db.session.commit()
        reset = clock.next_month_start().isoformat()
    client = app.test_client()
    sign_in(client)
    # a browser that reached this server as mail.example.net:8080, with the session cookie
    cookie = f"session={client.get_cookie('session').value}"
    page = app.test_client(use_cookies=False).get(
        "/account", headers={"Host": "mail.example.net:8080", "Cookie": cookie}).get_data(as_text=True)
    assert 'data-testid="api-base">http://mail.example.net:8080/api<' in page
    assert 'data-testid="plan">Free<' in page and 'data-testid="domain-types">Free<' in page
    assert "1,234 of 50,000" in page and 'data-testid="quota-remaining">48,766<' in page
    assert f'datetime="{reset}"' in page


def test_quota_on_the_page_follows_real_api_use(app, client):
    make_user(app)
    sign_in(client)
    raw = new_key_from(post_form(client, "/account/key", {}, "/account").get_data(as_text=True))
    auth = {"Authorization": f"Bearer {raw}"}
    assert client.post("/api/emails", headers=auth).status_code == 200
    assert client.get("/api/messages", headers=auth).status_code == 422  # errors do not count
    assert "1 of 50,000" in client.get("/account").get_data(as_text=True)


def test_header_links_follow_the_sign_in_state(app, client):
    make_user(app)
    assert 'href="/signin"' in client.get("/docs").get_data(as_text=True)
    sign_in(client)
    assert 'href="/account">API Management' in client.get("/docs").get_data(as_text=True)
