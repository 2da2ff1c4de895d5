"""What must not leak: /metrics to strangers, who has an account (sign-up),
mailbox tokens into the logs (gunicorn with deploy/gunicorn.conf.py, the
settings `make run` uses too), and the client address that IP limits key on
(a forged X-Forwarded-For, for each deployment's documented setting)."""
from __future__ import annotations

import http.client
import re
import shutil
import statistics
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import delete, select, text

import mailhandler
from models import Domain, Mailbox, RateCounter, User, db

from conftest import free_port, wait_for_port  # tests/conftest.py

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

def mailbox_with_mail(app) -> tuple[str, int, int]:
    """A mailbox token, one message id and its attachment id."""
    with app.app_context():
        box = Mailbox.create("logged", Domain.by_name("example.com"), 86400)
        (msg,) = mailhandler.deliver(build_message(1, box.address, [("a.bin", b"attached bytes")]), [box.address])
        return box.email_token(), msg.id, msg.attachments[0].id


def break_message_row(app, msg_id: int) -> None:
    """Make loading the message fail (a date SQLite keeps but nobody can read)."""
    with app.app_context():
        db.session.execute(text("UPDATE messages SET received_at = 'not a date' WHERE id = :i"), {"i": msg_id})
        db.session.commit()


def get(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_logs_never_hold_a_mailbox_token(app, tmp_path):
    token, msg_id, att_id = mailbox_with_mail(app)
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
        break_message_row(app, msg_id)
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
    runner = (ROOT / "Makefile").read_text() + (ROOT / "deploy/run.sh").read_text()  # make run -> run.sh
    assert re.search(r"gunicorn\"? --config deploy/gunicorn\.conf\.py\b", runner), "make run must use it too"


# --------------------------------------------------------------------------
# client addresses behind proxies

# How each deployment reaches the app: who is REMOTE_ADDR, and what becomes of
# an X-Forwarded-For header the client sends itself. nginx and gunicorn alone
# run for real below; Passenger cannot run here, and this is what its WSGI
# loader hands the app (the client's address as REMOTE_ADDR, headers untouched).
TOPOLOGIES = {
    # nginx with `proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for`
    "nginx": lambda real, forged: ("127.0.0.1", f"{forged}, {real}"),
    "passenger": lambda real, forged: (real, forged),
    # gunicorn (or `make run`) facing clients itself
    "gunicorn alone": lambda real, forged: (real, forged),
}
ROW_RE = re.compile(r"^\|\s*(?P<name>[^|]+?)\s*\|[^|]*\|\s*`\"behind_proxy\": (?P<value>true|false)`\s*\|\s*$", re.M)
LIMITS = {"mailbox_create": {"limit": 3, "window_seconds": 3600}}
NGINX_CACHE = ROOT / "test-artifacts" / "nginx"


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


def nginx_binary() -> Path | None:
    """nginx, installed or unpacked from the Debian package into test-artifacts/
    (not installed: nothing else runs it); None when neither is possible."""
    for candidate in (shutil.which("nginx"), "/usr/sbin/nginx", NGINX_CACHE / "root/usr/sbin/nginx"):
        if candidate and Path(candidate).exists():
            return Path(candidate)
    NGINX_CACHE.mkdir(parents=True, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", "nginx"], cwd=NGINX_CACHE, check=True, timeout=120,
                       capture_output=True)
        subprocess.run(["dpkg-deb", "-x", str(next(NGINX_CACHE.glob("nginx_*.deb"))),
                        str(NGINX_CACHE / "root")], check=True, timeout=60)
    except (OSError, subprocess.SubprocessError, StopIteration):
        return None
    return NGINX_CACHE / "root/usr/sbin/nginx"


def shipped_nginx_parts() -> tuple[str, str]:
    """From deploy/nginx/tempmail.conf: its http-level lines (the masking maps
    and log format) and the proxy_set_header lines of its proxying location."""
    text = (ROOT / "deploy/nginx/tempmail.conf").read_text()
    http_level = "\n".join(re.findall(r"^(?:map .*?^\}|log_format .*?;)$", text, re.M | re.S))
    proxying = next(block for block in re.findall(r"location / \{(.*?)\}", text, re.S) if "proxy_pass" in block)
    return http_level, "\n".join(re.findall(r"^\s*(proxy_set_header .*?;)", proxying, re.M))


class Nginx:
    """nginx in the foreground (no master, no daemon) in front of ``upstream``,
    with the shipped proxy headers and access-log format."""

    def __init__(self, binary: Path, folder: Path, upstream: int):
        self.binary, self.folder, self.port = binary, folder, free_port()
        folder.mkdir(exist_ok=True)
        http_level, headers = shipped_nginx_parts()
        temp = " ".join(f"{kind}_temp_path {folder}/{kind};" for kind in
                        ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (folder / "nginx.conf").write_text(
            f"pid {folder}/nginx.pid;\nevents {{}}\nhttp {{\n{temp}\n{http_level}\n"
            f"server {{ listen 127.0.0.1:{self.port}; access_log {folder}/access.log tempmail;\n"
            f"location / {{ proxy_pass http://127.0.0.1:{upstream};\n{headers}\n}} }} }}\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Nginx":
        self.proc = subprocess.Popen([str(self.binary), "-p", str(self.folder), "-e", str(self.folder / "error.log"),
                                      "-c", str(self.folder / "nginx.conf"), "-g", "daemon off; master_process off;"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        wait_for_port(self.port)
        return self

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def get_from(port: int, path: str, source: str, headers: dict) -> int:
    """A GET from the loopback address ``source`` (all of 127/8 is this machine)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers)
        return conn.getresponse().status
    finally:
        conn.close()


def buckets(app) -> list[str]:
    with app.app_context():
        return sorted(db.session.scalars(select(RateCounter.bucket)))


def fresh_app(app_factory, behind_proxy: bool):
    """An app with limit 3 per IP; the apps of one test share a database, so
    each run starts with no counters."""
    app = app_factory({"behind_proxy": behind_proxy, "rate_limits": LIMITS})
    with app.app_context():
        db.session.execute(delete(RateCounter))
        db.session.commit()
    return app


def simulated_run(app_factory, topology: str, behind_proxy: bool) -> tuple[list[int], int, list[str]]:
    """Six /generate calls from one client that forges a new X-Forwarded-For
    each time, then one from another client, as the app sees them in ``topology``."""
    app = fresh_app(app_factory, behind_proxy)
    client = app.test_client()

    def call(real: str, forged: str) -> int:
        remote, xff = TOPOLOGIES[topology](real, forged)
        return client.get("/generate", headers={"X-Forwarded-For": xff},
                          environ_base={"REMOTE_ADDR": remote}).status_code
    forged = [call("198.51.100.7", f"10.9.8.{n}") for n in range(6)]
    return forged, call("198.51.100.8", "10.9.8.200"), buckets(app)


def real_run(app_factory, tmp_path: Path, behind_proxy: bool, nginx: Path | None):
    """The same over real sockets: clients at 127.0.0.7 and 127.0.0.8, to
    gunicorn, or to nginx in front of it. Also opens a mailbox page through
    nginx to read its access log. -> (forged, other, buckets, nginx log)."""
    app = fresh_app(app_factory, behind_proxy)
    name = "nginx" if nginx else "alone"
    with app.app_context():
        token = Mailbox.create(f"proxied{name}", Domain.by_name("example.com"), 86400).email_token()
    web = Gunicorn(write_config(app, tmp_path / f"{name}.json"), tmp_path / f"{name}.log", workers=1).start()
    proxy = Nginx(nginx, tmp_path / "nginx", web.port).start() if nginx else None
    port = proxy.port if proxy else web.port
    try:
        forged = [get_from(port, "/generate", "127.0.0.7", {"X-Forwarded-For": f"10.9.8.{n}"}) for n in range(6)]
        other = get_from(port, "/generate", "127.0.0.8", {"X-Forwarded-For": "10.9.8.200"})
        if proxy:
            assert get_from(port, f"/m/{token}", "127.0.0.7", {"Referer": f"http://x/m/{token}/inbox"}) == 200
    finally:
        if proxy:
            proxy.stop()
        web.stop()
    log = (tmp_path / "nginx/access.log").read_text() if proxy else ""
    return forged, other, buckets(app), log, token


def test_a_forged_x_forwarded_for_picks_no_bucket(app_factory, tmp_path):
    settings = documented_settings()
    nginx = nginx_binary()
    results = {"passenger": simulated_run(app_factory, "passenger", settings["passenger"])}
    forged, other, keys, nginx_log, token = real_run(app_factory, tmp_path, settings["gunicorn alone"], None)
    results["gunicorn alone"] = (forged, other, keys)
    if nginx is not None:
        forged, other, keys, nginx_log, token = real_run(app_factory, tmp_path, settings["nginx"], nginx)
        results["nginx"] = (forged, other, keys)
    else:  # no nginx to be had on this machine: what the app would see from it
        results["nginx"] = simulated_run(app_factory, "nginx", settings["nginx"])
    how = {"nginx": "real nginx + gunicorn" if nginx else "simulated (no nginx binary here)",
           "gunicorn alone": "real gunicorn", "passenger": "simulated Passenger environ"}
    for topology, (forged, other, keys) in results.items():
        record("leaks", f"{topology} ({how[topology]}, documented behind_proxy={str(settings[topology]).lower()}): "
               f"one client forging X-Forwarded-For 6 times -> {forged}, another client -> {other}; buckets {keys}")
    # why Passenger must not set it: nothing there appends the real address
    wrong, _, wrong_keys = simulated_run(app_factory, "passenger", True)
    record("leaks", f"passenger with behind_proxy=true (the old advice): forged X-Forwarded-For -> {wrong}, "
           f"{len(wrong_keys)} buckets: the client picks its own")
    if nginx is not None:
        record("leaks", f"nginx access log (deploy/nginx/tempmail.conf's format): token present "
               f"{token in nginx_log}, masked lines {nginx_log.count('/m/~')}")
        assert token not in nginx_log and nginx_log.count("/m/~") == 2
    assert settings == {"nginx": True, "passenger": False, "gunicorn alone": False}
    for topology, (forged, other, keys) in results.items():
        assert forged == [200, 200, 200, 429, 429, 429], topology
        assert other == 200, topology
        assert len(keys) == 2 and "10.9.8" not in " ".join(keys), (topology, keys)
    assert wrong == [200] * 6 and len(wrong_keys) == 7
