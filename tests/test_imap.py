"""``flask imap-poll`` against a real Dovecot, started by the test as an
unprivileged user on a spare port with a throw-away maildir."""
from __future__ import annotations

import getpass
import grp
import imaplib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import free_port, wait_for_port
from models import Domain, Mailbox

DOVECOT = "/usr/sbin/dovecot"
CONF = """\
base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_mechanisms = plain login
default_login_user = {user}
default_internal_user = {user}
default_internal_group = {group}
mail_location = maildir:{d}/mail/%u
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/passwd
}}
userdb {{
  driver = static
  args = uid={user} gid={group} home={d}/home/%u
}}
service imap-login {{
  chroot =
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
service anvil {{
  chroot =
}}
"""


@pytest.fixture
def dovecot():
    """A Dovecot IMAP server with one mailbox ``catch`` / ``secret``."""
    if not os.path.exists(DOVECOT):
        pytest.fail("Dovecot is not installed (make system-deps installs dovecot-imapd)")
    # Dovecot refuses nothing as root, but a test has no business running it so.
    user = "nobody" if os.geteuid() == 0 else getpass.getuser()
    group = grp.getgrgid(pwd.getpwnam(user).pw_gid).gr_name
    folder = Path(tempfile.mkdtemp(prefix="tempmail-dovecot-"))
    port = free_port()
    (folder / "dovecot.conf").write_text(CONF.format(d=folder, user=user, group=group, port=port))
    (folder / "passwd").write_text("catch:{PLAIN}secret\n")
    if os.geteuid() == 0:
        for path in [folder, *folder.rglob("*")]:
            shutil.chown(path, user, group)
    proc = subprocess.Popen([DOVECOT, "-F", "-c", str(folder / "dovecot.conf")], user=user, group=group,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield {"host": "127.0.0.1", "port": port, "tls": False, "user": "catch", "password": "secret",
               "folder": "INBOX"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(folder, ignore_errors=True)


def imap(conf: dict) -> imaplib.IMAP4:
    conn = imaplib.IMAP4(conf["host"], conf["port"], timeout=20)
    conn.login(conf["user"], conf["password"])
    return conn


def test_imap_poll_drains_what_it_stores(app_factory, dovecot):
    app = app_factory({"imap": dovecot})
    with app.app_context():
        for name in ("imapa", "imapb"):
            Mailbox.create(name, Domain.by_name("example.com"), 3600)
    conn = imap(dovecot)
    for raw in (b"Delivered-To: imapa@example.com\r\nTo: list@lists.example.org\r\nSubject: bcc\r\n\r\nx\r\n",
                b"To: Someone <imapb@example.com>, other@example.org\r\nSubject: to\r\n\r\nx\r\n",
                b"To: ghost@example.com\r\nSubject: unknown\r\n\r\nx\r\n",
                b"X-Original-To: imapb@example.com\r\nSubject: retried\r\n\r\nx\r\n"):
        assert conn.append("INBOX", None, None, raw)[0] == "OK"
    conn.logout()

    runner = app.test_cli_runner()
    app.config["FAIL_NEXT_STORE"] = 0
    first = runner.invoke(args=["imap-poll", "--once"])
    assert first.exit_code == 0, first.output
    assert "stored 3, refused 1, failed 0" in first.output

    client = app.test_client()
    subjects = {name: [m["subject"] for m in client.get(f"/api.php/inbox/{name}@example.com")
                       .get_json()["emails"]] for name in ("imapa", "imapb")}
    assert subjects == {"imapa": ["bcc"], "imapb": ["to", "retried"]}

    conn = imap(dovecot)
    conn.select("INBOX")
    _, uids = conn.uid("SEARCH", None, "ALL")
    (left,) = uids[0].split()
    _, fetched = conn.uid("FETCH", left, "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    assert b"\\Seen" in fetched[0][0] and b"unknown" in fetched[0][1]
    assert conn.append("INBOX", None, None, b"To: imapa@example.com\r\nSubject: later\r\n\r\nx\r\n")[0] == "OK"
    conn.logout()

    app.config["FAIL_NEXT_STORE"] = 1  # a passing failure: the message stays for the next poll
    assert "stored 0, refused 0, failed 1" in runner.invoke(args=["imap-poll", "--once"]).output
    assert "stored 1, refused 0, failed 0" in runner.invoke(args=["imap-poll", "--once"]).output
    emails = client.get("/api.php/inbox/imapa@example.com").get_json()["emails"]
    assert [m["subject"] for m in emails] == ["bcc", "later"]


def test_imap_poll_reports_a_bad_login(app_factory, dovecot):
    app = app_factory({"imap": dict(dovecot, password="wrong")})
    result = app.test_cli_runner().invoke(args=["imap-poll", "--once"])
    assert result.exit_code != 0 and "IMAP" in result.output
