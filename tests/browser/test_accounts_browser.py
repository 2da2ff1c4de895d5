"""Sign up, create a key on API Management, use it against the User API of the
live server, regenerate it, sign out and back in: one visitor's path in
headless Chromium (fixtures in tests/browser/conftest.py)."""
from __future__ import annotations

import re

import requests

PASSWORD = "browser pass 123"


def sign_up(page, base: str, email: str) -> None:
    """Sign up, then sign in on the page sign-up leads to (address filled in)."""
    page.goto(base + "/signup")
    page.get_by_label("E-mail address").fill(email)
    page.get_by_label("Password", exact=True).fill(PASSWORD)
    page.get_by_label("Repeat the password").fill(PASSWORD)
    page.get_by_role("button", name="Create account").click()
    page.wait_for_url(base + "/signin")
    assert page.get_by_label("E-mail address").input_value() == email
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(base + "/account")


def test_sign_up_create_key_and_use_it(live_server, page):
    base = live_server.url
    sign_up(page, base, "browser@example.org")
    assert page.get_by_role("heading", name="API Management").is_visible()
    assert page.get_by_test_id("api-base").inner_text() == base + "/api"
    page.get_by_role("button", name="Create API key").click()
    raw = page.get_by_test_id("new-key").inner_text().strip()
    assert re.fullmatch(r"tm_[A-Za-z0-9_-]{40,}", raw)

    api = page.get_by_test_id("api-base").inner_text()
    created = requests.post(api + "/emails", headers={"Authorization": f"Bearer {raw}",
                                                      "Accept": "application/json"}, timeout=30)
    assert created.status_code == 200 and created.json()["status"] is True
    assert created.headers["X-RateLimit-Used"] == "1"
    address = created.json()["data"]["email"]
    listed = requests.get(api + "/messages", params={"email": address},
                          headers={"Authorization": f"Bearer {raw}"}, timeout=30)
    assert listed.status_code == 200 and listed.json()["messages"] == []

    # after a reload: usage counted, and only the prefix of the key is left
    page.goto(base + "/account")
    assert page.get_by_test_id("quota-used").inner_text() == "2 of 50,000"
    assert raw not in page.content()
    assert page.get_by_test_id("key-prefix").inner_text() == raw[:11] + "…"

    page.get_by_role("button", name="Regenerate key").click()
    fresh = page.get_by_test_id("new-key").inner_text().strip()
    assert fresh != raw
    old = requests.get(api + "/domains", headers={"Authorization": f"Bearer {raw}"}, timeout=30)
    assert old.status_code == 401
    assert requests.get(api + "/domains", headers={"Authorization": f"Bearer {fresh}"},
                        timeout=30).status_code == 200
    sign_out_and_back_in(page, base, "browser@example.org")


def sign_out_and_back_in(page, base: str, email: str) -> None:
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_url(base + "/signin")
    assert page.get_by_role("link", name="Sign in").is_visible()
    page.get_by_label("E-mail address").fill(email)
    page.get_by_label("Password").fill("wrong password")
    page.get_by_role("button", name="Sign in").click()
    assert page.get_by_role("alert").inner_text() == "Wrong e-mail address or password."
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(base + "/account")
    assert page.get_by_role("link", name="API Management").is_visible()
    assert page.get_by_test_id("key-prefix").is_visible()
