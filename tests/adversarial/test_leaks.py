"""What must not leak: /metrics to strangers, who has an account (sign-up),
mailbox tokens into the logs (gunicorn with deploy/gunicorn.conf.py, the
settings `make run` uses too), and the client address that IP limits key on
(a forged X-Forwarded-For, for each deployment's documented setting)."""
from __future__ import annotations

import re
import statistics
import time
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import select
from werkzeug.security import generate_password_hash

import mailhandler
import models
from app import email_token
from models import Domain, Mailbox, RateCounter, User, db

from .helpers import ROOT, Gunicorn, build_message, record, write_config

TOKEN_RE = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf(client, path: str) -> str:
    match = TOKEN_RE.search(client.get(path).get_data(as_text=True))
    assert match, f"no csrf_token on {path}"
    return match.group(1)


# --------------------------------------------------------------------------
# /metrics

def scrape(client, remote: str = "127.0.0.1", xff: str | None = None, token: str | None = None) -> int:
    headers = {"X-Forwarded-For": xff} if xff else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return client.get("/metrics", headers=headers, environ_base={"REMOTE_ADDR": remote}).status_code


def test_metrics_answer_only_this_machine_or_the_token(app_factory):
    direct = app_factory().test_client()  # the default: metrics on, no token
    proxied = app_factory({"behind_proxy": True}).test_client()
    tokened = app_factory({"metrics": {"enabled": True, "token": "s3cret-scraper"}}).test_client()
    seen = {
        "loopback": scrape(direct), "loopback ::1": scrape(direct, "::1"),
        "remote": scrape(direct, "203.0.113.7"), "remote ::ffff:": scrape(direct, "::ffff:203.0.113.7"),
        "remote saying XFF 127.0.0.1": scrape(direct, "203.0.113.7", "127.0.0.1"),
        "relayed by a proxy not declared (behind_proxy false)": scrape(direct, "127.0.0.1", "203.0.113.7"),
        "behind_proxy: remote through nginx": scrape(proxied, "127.0.0.1", "203.0.113.7"),
        "behind_proxy: forged 127.0.0.1 through nginx": scrape(proxied, "127.0.0.1", "127.0.0.1, 203.0.113.7"),
        "behind_proxy: local scraper through nginx": scrape(proxied, "127.0.0.1", "127.0.0.1"),
        "token: remote with it": scrape(tokened, "203.0.113.7", token="s3cret-scraper"),
        "token: remote without": scrape(tokened, "203.0.113.7"),
        "token: loopback without": scrape(tokened),
    }
    record("leaks", "/metrics by default (no token): " + ", ".join(f"{k} {v}" for k, v in seen.items()))
    assert seen == {
        "loopback": 200, "loopback ::1": 200, "remote": 403, "remote ::ffff:": 403,
        "remote saying XFF 127.0.0.1": 403, "relayed by a proxy not declared (behind_proxy false)": 403,
        "behind_proxy: remote through nginx": 403, "behind_proxy: forged 127.0.0.1 through nginx": 403,
        "behind_proxy: local scraper through nginx": 200,
        "token: remote with it": 200, "token: remote without": 401, "token: loopback without": 401}


# --------------------------------------------------------------------------
# sign-up

def sign_up_answer(app, email: str) -> tuple[dict, float]:
    """Everything a stranger sees of one sign-up (the typed address blanked
    out), and how long it took."""
    client = app.test_client()
    data = {"csrf_token": csrf(client, "/signup"), "email": email, "password": "a new password 1",
            "confirm": "a new password 1"}
    started = time.perf_counter()
    resp = client.post("/signup", data=data)
    elapsed = time.perf_counter() - started
    cookie = app.session_interface.get_signing_serializer(app).loads(client.get_cookie("session").value)
    cookie.pop("csrf_token", None)
    blank = lambda text: text.replace(email, "<email>")  # noqa: E731
    follow = client.get(resp.headers["Location"]) if resp.status_code in (302, 303) else None
    page = TOKEN_RE.sub("<csrf>", follow.get_data(as_text=True)) if follow else ""
    return {"status": resp.status_code, "location": resp.headers.get("Location"),
            "header names": sorted(k for k, _ in resp.headers), "body": resp.get_data(as_text=True),
            "session": blank(repr(sorted(cookie.items()))), "next page": (follow and follow.status_code,
                                                                        blank(page))}, elapsed


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"], indirect=True)
def test_signup_does_not_tell_who_has_an_account(app, backend):
    with app.app_context():
        User.create("taken@users.test", password="the owner's password")
        db.session.commit()
    fresh, taken, times = [], [], {"new": [], "taken": []}
    for n in range(3):
        answer, seconds = sign_up_answer(app, f"fresh{n}@users.test")
        fresh.append(answer)
        times["new"].append(seconds)
        answer, seconds = sign_up_answer(app, "taken@users.test")
        taken.append(answer)
        times["taken"].append(seconds)
    with app.app_context():
        owner_intact = User.by_email("taken@users.test").check_password("the owner's password")
    medians = {k: f"{statistics.median(v) * 1000:.0f} ms" for k, v in times.items()}
    record("leaks", f"{backend}: sign-up of a new vs a taken address: status {fresh[0]['status']} vs "
           f"{taken[0]['status']}, same redirect/body/cookie/next page: {fresh[0] == taken[0]}; median time "
           f"{medians['new']} vs {medians['taken']} (not asserted); the owner's password intact: {owner_intact}")
    assert fresh[0] == taken[0] and all(a == fresh[0] for a in fresh + taken)
    assert fresh[0]["status"] == 303 and owner_intact


# --------------------------------------------------------------------------
# logs

def mailbox_with_mail(app) -> tuple[str, int, int, Path]:
    """A mailbox token, one message id, its attachment id and the attachment's stored file."""
    with app.app_context():
        box = Mailbox.create("logged", Domain.by_name("example.com"), 86400)
        (msg,) = mailhandler.deliver(build_message(1, box.address, [("a.bin", b"attached bytes")]), [box.address])
        att = msg.attachments[0]
        return email_token(box), msg.id, att.id, models.file_path(att.stored_path)


def get(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_logs_never_hold_a_mailbox_token(app, tmp_path):
    token, msg_id, att_id, att_file = mailbox_with_mail(app)
    access, errors = tmp_path / "access.log", tmp_path / "error.log"
    web = Gunicorn(write_config(app, tmp_path / "config.json"), tmp_path / "gunicorn.out", workers=1,
                   extra=["--config", str(ROOT / "deploy/gunicorn.conf.py"), "--access-logfile", str(access),
                          "--error-logfile", str(errors)]).start()
    page = f"{web.url}/m/{token}"
    try:
        statuses = [get(page), get(f"{page}/inbox.json"), get(f"{page}/messages/{msg_id}?partial=1"),
                    get(f"{page}/messages/{msg_id}/raw"), get(f"{web.url}/m%2F{token}/inbox.json"),
                    get(f"{web.url}/static/style.css", {"Referer": f"{page}/messages/{msg_id}"}),
                    get(f"{page}/messages/{msg_id}/body", {"Referer": page})]
        # an internal error on a token URL: the app's own log line names the path
        att_file.unlink()
        att_file.mkdir()
        statuses.append(get(f"{page}/messages/{msg_id}/attachments/{att_id}"))
    finally:
        web.stop()
    logged = access.read_text() + errors.read_text()
    masked = len(re.findall(r"/m/~[0-9a-f]{8}", logged))
    record("leaks", f"gunicorn with deploy/gunicorn.conf.py: {len(statuses)} requests on /m/<token> URLs "
           f"(paths, %2F, Referer, an internal error) -> {statuses}; token in the logs "
           f"{logged.count(token)} times, masked as /m/~<fingerprint> {masked} times")
    assert statuses == [200, 200, 200, 200, 200, 200, 200, 500]
    assert token not in logged and token[:24] not in logged
    assert access.read_text().count("/m/~") >= 8 and "Exception on /m/~" in errors.read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"gunicorn --config deploy/gunicorn\.conf\.py\b", makefile), "make run must use it too"


# --------------------------------------------------------------------------
# client addresses behind proxies

# How each deployment reaches the app: who is REMOTE_ADDR, and what becomes of
# an X-Forwarded-For header the client sends itself.
TOPOLOGIES = {
    # nginx with `proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for`
    "nginx": lambda real, forged: ("127.0.0.1", f"{forged}, {real}"),
    # Passenger gives the client's address as REMOTE_ADDR and passes its headers on untouched
    "passenger": lambda real, forged: (real, forged),
    # gunicorn (or `make run`) facing clients itself
    "direct": lambda real, forged: (real, forged),
}
ROW_RE = re.compile(r"^\|\s*(?P<name>[^|]+?)\s*\|[^|]*\|\s*`\"behind_proxy\": (?P<value>true|false)`\s*\|\s*$", re.M)


def documented_settings() -> dict[str, bool]:
    """docs/deployment.md's table: deployment -> its ``behind_proxy``."""
    text = (ROOT / "docs/deployment.md").read_text()
    rows = {m["name"].lower(): m["value"] == "true" for m in ROW_RE.finditer(text)}
    found = {}
    for key in TOPOLOGIES:
        matches = [value for name, value in rows.items() if key in name]
        assert len(matches) == 1, f"docs/deployment.md documents no single behind_proxy row for {key}: {rows}"
        found[key] = matches[0]
    return found


def generate_from(client, real: str, forged: str, topology: str) -> int:
    remote, xff = TOPOLOGIES[topology](real, forged)
    return client.get("/generate", headers={"X-Forwarded-For": xff},
                      environ_base={"REMOTE_ADDR": remote}).status_code


def buckets(app) -> list[str]:
    with app.app_context():
        return sorted(db.session.scalars(select(RateCounter.bucket)))


def run_topology(app_factory, topology: str, behind_proxy: bool) -> tuple[list[int], int, list[str]]:
    """Six /generate calls from one client that forges a new X-Forwarded-For
    each time, then one from another client; limit 3 per IP."""
    app = app_factory({"behind_proxy": behind_proxy,
                       "rate_limits": {"mailbox_create": {"limit": 3, "window_seconds": 3600}}})
    client = app.test_client()
    forged = [generate_from(client, "198.51.100.7", f"10.9.8.{n}", topology) for n in range(6)]
    other = generate_from(client, "198.51.100.8", "10.9.8.200", topology)
    return forged, other, buckets(app)


def test_a_forged_x_forwarded_for_picks_no_bucket(app_factory):
    settings = documented_settings()
    results = {}
    for topology, behind_proxy in settings.items():
        forged, other, keys = run_topology(app_factory, topology, behind_proxy)
        results[topology] = (behind_proxy, forged, other, keys)
        record("leaks", f"{topology} (documented behind_proxy={str(behind_proxy).lower()}): one client forging "
               f"X-Forwarded-For 6 times -> {forged}, another client -> {other}; buckets {keys}")
    # why Passenger must not set it: nothing there appends the real address
    wrong, _, wrong_keys = run_topology(app_factory, "passenger", True)
    record("leaks", f"passenger with behind_proxy=true (the old advice): forged X-Forwarded-For -> {wrong}, "
           f"{len(wrong_keys)} buckets: the client picks its own")
    for topology, (behind_proxy, forged, other, keys) in results.items():
        assert forged == [200, 200, 200, 429, 429, 429], topology
        assert other == 200, topology
        assert keys == ["mailbox_create:198.51.100.7", "mailbox_create:198.51.100.8"], (topology, keys)
    assert settings == {"nginx": True, "passenger": False, "direct": False}
    assert wrong == [200] * 6 and len(wrong_keys) == 7
