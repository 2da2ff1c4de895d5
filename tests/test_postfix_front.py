"""A real Postfix in front of the real ``flask smtpd``, configured the way
docs/deployment.md (section 3) and deploy/postfix/ configure it: Postfix
takes mail on SMTP and hands it over LMTP on a Unix socket. Mail that needs
SMTPUTF8 (a UTF-8 sender, raw UTF-8 headers) must be delivered, not bounced
with "SMTPUTF8 is required, but was not offered" (issue 15, item 1); the
daemon is started as root by hand, without systemd, and Postfix (user
postfix) must still reach its socket (issue 15, item 7).

The Postfix instance is the test's own: its own configuration, queue and
data folders in a temporary directory, SMTP on a loopback port, started
with ``postfix -c DIR start`` and stopped with ``postfix -c DIR stop``.
Postfix's master must start as root; ``make system-deps`` installs it."""
from __future__ import annotations

import os
import shutil
import smtplib
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from adversarial.helpers import Daemon, write_config
from conftest import ROOT, free_port, wait_for_port
from models import Domain, Mailbox

POSTFIX, POSTCONF, SENDMAIL = "/usr/sbin/postfix", "/usr/sbin/postconf", "/usr/sbin/sendmail"
STOCK_MASTER_CF = Path("/etc/postfix/master.cf")
SUBJECT = "Grüße – 你好 – Привет"
SENDER = "zoë@exämple.org"


def configure(folder: Path, port: int, lmtp_socket: Path) -> Path:
    """The instance's configuration folder: main.cf made with the commands
    docs/deployment.md gives (the snippet applied line by line with
    ``postconf -e``, then the no-certificate and no-rspamd steps), and
    master.cf as Debian ships it plus deploy/postfix/master.cf. Then only
    what a private instance on this machine needs on top."""
    etc = folder / "etc"
    etc.mkdir()
    (etc / "main.cf").touch()
    postconf(etc, "-e", *snippet_lines(ROOT / "deploy/postfix/main.cf"))
    postconf(etc, "-X", "smtpd_tls_cert_file", "smtpd_tls_key_file")  # no certificate yet
    postconf(etc, "-e", "smtpd_tls_security_level = none")
    postconf(etc, "-X", "smtpd_milters", "milter_protocol", "milter_default_action")  # no rspamd
    (etc / "master.cf").write_text(STOCK_MASTER_CF.read_text() + (ROOT / "deploy/postfix/master.cf").read_text())
    postconf(etc, "-e", f"queue_directory = {folder / 'queue'}", f"data_directory = {folder / 'data'}",
             "inet_interfaces = loopback-only", "inet_protocols = ipv4",
             f"virtual_transport = tempmail-lmtp:unix:{lmtp_socket}",
             # No syslogd here: Postfix's own log file.
             f"maillog_file = {folder / 'maillog'}", f"maillog_file_prefixes = {folder}",
             "syslog_name = postfix-tempmail-test",
             # No local delivery here, so no /etc/aliases database to build.
             "alias_maps =", "alias_database =",
             # Postfix waits this long between looks at a pending recipient
             # check (default 3s); shorter only to keep the test quick.
             "address_verify_poll_delay = 1s")
    postconf(etc, "-F", "-e", f"smtp/inet/service = 127.0.0.1:{port}")
    # Debian chroots most services; its init script copies the files a chroot
    # needs for the system's own instance only, so this one runs unchrooted.
    for line in postconf(etc, "-F", "*/*/chroot").splitlines():
        name, _, value = line.partition(" = ")
        if value == "y":
            postconf(etc, "-F", "-e", f"{name} = n")
    (folder / "queue").mkdir(mode=0o755)  # root's, as Postfix requires; it makes the rest
    return etc


def snippet_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def postconf(etc: Path, *args: str) -> str:
    return subprocess.run([POSTCONF, "-c", str(etc), *args], check=True, capture_output=True, text=True,
                          timeout=60).stdout


class PrivatePostfix:
    """``postfix -c DIR start`` / ``stop`` on this test's configuration."""

    def __init__(self, folder: Path, lmtp_socket: Path):
        self.folder, self.port = folder, free_port()
        self.etc = configure(folder, self.port, lmtp_socket)

    def run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([POSTFIX, "-c", str(self.etc), *args], capture_output=True, text=True, timeout=120)

    def start(self) -> "PrivatePostfix":
        done = self.run("start")
        assert done.returncode == 0, f"postfix start failed: {done.stderr}\n{self.log()}"
        wait_for_port(self.port, timeout=60)
        return self

    def stop(self) -> None:
        self.run("stop")
        deadline = time.monotonic() + 60
        while self.run("status").returncode == 0 and time.monotonic() < deadline:
            time.sleep(0.2)

    def log(self) -> str:
        path = self.folder / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def sendmail(self, sender: str, rcpt: str, data: bytes) -> subprocess.CompletedProcess:
        """Submit as a local program does: Postfix's sendmail(1), which flags
        mail with raw UTF-8 in its headers or envelope as needing SMTPUTF8."""
        return subprocess.run([SENDMAIL, "-C", str(self.etc), "-i", "-f", sender, rcpt], input=data,
                              capture_output=True, timeout=60)


@pytest.fixture(params=["sqlite"])
def backend(request):
    """Once, on SQLite: what is tested here is the hand-over from Postfix;
    storing UTF-8 on both databases is tests/test_smtp_protocol.py's part."""
    return request.param


@pytest.fixture
def workdir():
    """A folder the postfix user can traverse (pytest's tmp_path is 0700)."""
    if os.geteuid() != 0:
        pytest.fail("Postfix's master starts as root only; run this test as root")
    for program in (POSTFIX, POSTCONF, SENDMAIL):
        if not os.path.exists(program):
            pytest.fail(f"{program} is missing (make system-deps installs Postfix)")
    folder = Path(tempfile.mkdtemp(prefix="tempmail-postfix-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def wait_for_outcome(postfix: PrivatePostfix, client, address: str, count: int) -> list[dict]:
    """Poll until ``count`` messages are in the inbox, or Postfix gives up on
    one (a bounce or a deferral is the failure this test exists for)."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        emails = client.get(f"/api.php/inbox/{address}").get_json().get("emails", [])
        if len(emails) >= count:
            return emails
        log = postfix.log()
        assert "status=bounced" not in log and "status=deferred" not in log, log
        time.sleep(0.2)
    raise AssertionError(f"{count} messages did not arrive; Postfix log:\n{postfix.log()}")


def test_postfix_in_front_delivers_mail_that_needs_smtputf8(app, client, workdir):
    with app.app_context():
        Mailbox.create("uni", Domain.by_name("example.com"), 86400)
    (workdir / "run").mkdir(mode=0o755)
    lmtp_socket = workdir / "run" / "lmtp.sock"
    # As a newcomer runs it: by hand, as root, no systemd UMask; the keys
    # give the socket to Postfix's group.
    config = write_config(app, workdir / "config.json", smtp={"host": "127.0.0.1", "port": 0},
                          lmtp={"socket": str(lmtp_socket), "group": "postfix", "mode": "0660"})
    daemon = Daemon(config, workdir / "smtpd.log").start()
    postfix = PrivatePostfix(workdir, lmtp_socket)
    try:
        postfix.start()
        with smtplib.SMTP("127.0.0.1", postfix.port, local_hostname="sender.test", timeout=60) as conn:
            conn.ehlo()
            offered = conn.has_extn("smtputf8")
            raw = (f"From: Zoë <{SENDER}>\r\nTo: uni@example.com\r\nSubject: {SUBJECT}\r\n"
                   "Message-ID: <smtp-1@exämple.org>\r\n\r\nüber SMTP\r\n").encode()
            refused = conn.sendmail(SENDER, ["uni@example.com"], raw, mail_options=["SMTPUTF8", "BODY=8BITMIME"])
            # A UTF-8 local part with no mailbox: Postfix asks TempMail over
            # LMTP (reject_unverified_recipient) and refuses it in the dialogue.
            conn.mail(SENDER, ["SMTPUTF8"])
            unknown = conn.rcpt("用户@example.com")
            conn.rset()
        submitted = postfix.sendmail(SENDER, "uni@example.com",
                                     f"From: {SENDER}\nTo: uni@example.com\nSubject: {SUBJECT} (sendmail)\n"
                                     f"\nüber sendmail\n".encode())
        emails = wait_for_outcome(postfix, client, "uni@example.com", 2)
        details = [client.get(f"/api.php/email/{e['id']}").get_json()["email"] for e in emails]
    finally:
        postfix.stop()
        daemon.stop()
    log = postfix.log()
    assert offered and refused == {} and submitted.returncode == 0, submitted.stderr
    # TempMail's own refusal, passed on by Postfix (not Postfix's 5.6.7 for a missing SMTPUTF8).
    assert unknown[0] == 550 and b"said: 550 5.1.1" in unknown[1] and b"User unknown" in unknown[1], unknown
    assert sorted(e["subject"] for e in emails) == [SUBJECT, f"{SUBJECT} (sendmail)"]
    assert {(d["from_email"], d["body_text"].strip()) for d in details} == {
        (SENDER, "über SMTP"), (SENDER, "über sendmail")}
    assert log.count("status=sent") == 2 and "SMTPUTF8 is required" not in log
    assert "Traceback" not in (workdir / "smtpd.log").read_text(errors="replace")
