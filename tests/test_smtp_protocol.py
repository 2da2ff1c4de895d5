"""The SMTP/LMTP protocol layer over real sockets (the in-process
MailServer): SMTPUTF8 and 8BITMIME, UTF-8 envelopes and headers read back
through api.php, replies that stay sendable, one client's failure kept to
that client, the LMTP socket's group and mode, and the log filter."""
from __future__ import annotations

import grp
import io
import logging
import os
import shutil
import smtplib
import socket
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

import logsafe
import smtpserver
from conftest import ROOT
from models import Domain, Mailbox

UTF8_MESSAGE = ("From: Zoë Ünïcode <zoë@exämple.org>\r\nTo: uni@example.com\r\n"
                "Subject: Grüße – 你好 – Привет\r\nMessage-ID: <utf8-1@exämple.org>\r\n\r\n"
                "Hällo wörld\r\n").encode()


@pytest.fixture
def mail_server(app):
    server = smtpserver.MailServer(app, "127.0.0.1", 0).start()
    yield server
    server.stop()


@pytest.fixture
def socket_dir():
    """A folder another user may traverse (pytest's tmp_path is 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="tempmail-lmtp-"))
    folder.chmod(0o711)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def make_box(app, name: str = "uni") -> None:
    with app.app_context():
        Mailbox.create(name, Domain.by_name("example.com"), 3600)


def stored_message(client, address: str) -> dict:
    summary = client.get(f"/api.php/inbox/{address}").get_json()
    (first,) = summary["emails"]
    return client.get(f"/api.php/email/{first['id']}").get_json()["email"]


def test_ehlo_and_lhlo_offer_smtputf8_and_8bitmime(app, socket_dir):
    server = smtpserver.MailServer(app, "127.0.0.1", 0, lmtp_socket=str(socket_dir / "lmtp.sock")).start()
    try:
        with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test") as conn:
            conn.ehlo()
            smtp_features = set(conn.esmtp_features)
        lmtp = smtplib.LMTP(str(socket_dir / "lmtp.sock"), local_hostname="mx.test")
        lmtp.ehlo()  # smtplib.LMTP sends LHLO here
        lmtp_features = set(lmtp.esmtp_features)
        lmtp.quit()
    finally:
        server.stop()
    for features in (smtp_features, lmtp_features):
        assert {"smtputf8", "8bitmime", "size", "pipelining"} <= features


@pytest.mark.parametrize("protocol", ["smtp", "lmtp"])
def test_utf8_envelope_and_raw_utf8_headers_are_stored_and_shown(app, client, socket_dir, protocol):
    make_box(app)
    server = smtpserver.MailServer(app, "127.0.0.1", 0, lmtp_socket=str(socket_dir / "lmtp.sock")).start()
    try:
        conn = (smtplib.LMTP(str(socket_dir / "lmtp.sock")) if protocol == "lmtp"
                else smtplib.SMTP("127.0.0.1", server.port))
        refused = conn.sendmail("zoë@exämple.org", ["uni@example.com"], UTF8_MESSAGE,
                                mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        conn.quit()
    finally:
        server.stop()
    email = stored_message(client, "uni@example.com")
    assert refused == {}
    assert (email["from_email"], email["from_name"]) == ("zoë@exämple.org", "Zoë Ünïcode")
    assert email["subject"] == "Grüße – 你好 – Привет"
    assert email["body_text"] == "Hällo wörld\n"


def test_utf8_local_part_without_mailbox_gets_a_clean_550(app, mail_server):
    make_box(app)
    with smtplib.SMTP("127.0.0.1", mail_server.port, local_hostname="client.test") as conn:
        conn.ehlo()
        # smtplib writes commands in ASCII; these are sent as UTF-8 bytes, as an SMTPUTF8 client does.
        conn.send("MAIL FROM:<zoë@exämple.org> SMTPUTF8 BODY=8BITMIME\r\n".encode())
        mail = conn.getreply()
        conn.send("RCPT TO:<用户@example.com>\r\n".encode())
        unknown = conn.getreply()
        conn.send("RCPT TO:<uni@example.com>\r\n".encode())
        known = conn.getreply()
        conn.send(b"RCPT TO:<\xff\xfe@example.com>\r\n")  # not UTF-8 at all
        broken = conn.getreply()
        conn.send(b"RCPT TO:<a\x00b@example.com>\r\n")
        nul = conn.getreply()
        assert conn.noop()[0] == 250
    assert mail[0] == 250
    assert unknown == (550, "5.1.1 <用户@example.com>: Recipient address rejected: User unknown".encode())
    assert known[0] == 250
    assert broken[0] == 501 and nul == (501, b"5.1.3 Bad recipient address syntax")


def test_internationalised_domain_in_the_envelope_finds_its_a_label(app_factory, client):
    app = app_factory({"domains": [{"domain": "xn--bcher-kva.example", "type": "free"}]})
    with app.app_context():
        Mailbox.create("reader", Domain.by_name("xn--bcher-kva.example"), 3600)
    server = smtpserver.MailServer(app, "127.0.0.1", 0).start()
    try:
        with smtplib.SMTP("127.0.0.1", server.port) as conn:
            refused = conn.sendmail("a@peer.test", ["reader@bücher.example"],
                                    b"Subject: idn\r\n\r\nbody\r\n", mail_options=["SMTPUTF8"])
    finally:
        server.stop()
    assert refused == {}
    assert stored_message(app.test_client(), "reader@xn--bcher-kva.example")["subject"] == "idn"


def test_a_failing_reply_closes_that_client_alone(app, monkeypatch):
    """The wake-up handler answers every client whose message was stored; an
    exception while answering one of them must not stop the others' replies
    (asyncore closed the wake-up pipe, and then nobody got an answer)."""
    failures = []

    class FailsOnce(smtpserver.SMTPChannel):
        def resume(self, reply: str) -> None:
            if not failures:
                failures.append(reply)
                raise RuntimeError("this client's reply could not be sent")
            super().resume(reply)

    monkeypatch.setattr(smtpserver, "SMTPChannel", FailsOnce)  # the listener looks the class up per accept
    make_box(app)
    server = smtpserver.MailServer(app, "127.0.0.1", 0).start()
    try:
        first = smtplib.SMTP("127.0.0.1", server.port, timeout=10)
        with pytest.raises(smtplib.SMTPServerDisconnected):
            first.sendmail("a@peer.test", ["uni@example.com"], b"Subject: one\r\n\r\nx\r\n")
        codes = []
        for n in range(5):
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as conn:
                conn.ehlo()
                conn.mail("b@peer.test")
                conn.rcpt("uni@example.com")
                codes.append(conn.data(f"Subject: after {n}\r\n\r\nx\r\n".encode())[0])
    finally:
        server.stop()
    assert failures and failures[0].startswith("250")
    assert codes == [250] * 5


def group_other_than_mine() -> grp.struct_group:
    """A group this process may give a file to, other than its own."""
    mine = os.getegid()
    candidates = [g for g in grp.getgrall() if g.gr_gid != mine]
    if os.geteuid() != 0:
        candidates = [g for g in candidates if g.gr_gid in os.getgroups()]
    if not candidates:
        pytest.fail("no second group to test lmtp.group with (run as root, or as a user in two groups)")
    return next((g for g in candidates if g.gr_name == "nogroup"), candidates[0])


def connects_as(user: str, group: str, path: Path) -> str:
    """Try the socket as another user and group (the way Postfix's lmtp
    client, user postfix, reaches it): the first reply line, or the error."""
    code = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
            "try:\n s.connect(sys.argv[1]); print(s.recv(100).decode().split()[0])\n"
            "except OSError as e: print(type(e).__name__)")
    return subprocess.run(["/usr/bin/python3", "-c", code, str(path)], user=user, group=group,
                          capture_output=True, text=True, timeout=30).stdout.strip()


def test_lmtp_socket_gets_default_mode_and_the_daemons_group(app, socket_dir):
    path = socket_dir / "lmtp.sock"
    old = os.umask(0o022)  # as root by hand: the umask alone would give srwxr-xr-x
    try:
        server = smtpserver.MailServer(app, "127.0.0.1", 0, lmtp_socket=str(path)).start()
    finally:
        os.umask(old)
    try:
        info = path.stat()
    finally:
        server.stop()
    assert stat.S_ISSOCK(info.st_mode)
    assert (stat.S_IMODE(info.st_mode), info.st_gid) == (0o660, os.getegid())


def test_lmtp_socket_group_and_mode_from_config_let_that_group_connect(app_factory, socket_dir):
    if os.geteuid() != 0:
        pytest.fail("this test connects as another user (nobody), which needs root")
    group = group_other_than_mine()
    path = socket_dir / "lmtp.sock"
    results = {}
    for mode in ("0660", "0600"):
        app = app_factory({"lmtp": {"socket": str(path), "group": group.gr_name, "mode": mode}})
        server = smtpserver.MailServer(app, "127.0.0.1", 0, lmtp_socket=str(path)).start()
        try:
            info = path.stat()
            results[mode] = (stat.S_IMODE(info.st_mode), info.st_gid,
                             connects_as("nobody", group.gr_name, path),
                             connects_as("nobody", "nogroup" if group.gr_name != "nogroup" else "daemon", path))
        finally:
            server.stop()
    by_gid = smtpserver.socket_access({"group": group.gr_gid})
    assert results["0660"] == (0o660, group.gr_gid, "220", "PermissionError")
    assert results["0600"] == (0o600, group.gr_gid, "PermissionError", "PermissionError")
    assert by_gid == (0o660, group.gr_gid)


@pytest.mark.parametrize("conf, key", [({"mode": "660x"}, "lmtp.mode"), ({"mode": 660}, "lmtp.mode"),
                                       ({"mode": "09999"}, "lmtp.mode"), ({"group": "no-such-group-x"}, "lmtp.group"),
                                       ({"group": True}, "lmtp.group"), ({"group": 2 ** 40}, "lmtp.group")])
def test_bad_lmtp_socket_settings_name_their_key(conf, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        smtpserver.socket_access(conf)


def test_flask_smtpd_refuses_an_unknown_lmtp_group_clearly(config_file, socket_dir):
    import json
    conf = json.loads(config_file.read_text())
    conf["lmtp"] = {"socket": str(socket_dir / "lmtp.sock"), "group": "no-such-group-x"}
    config_file.write_text(json.dumps(conf))
    env = dict(os.environ, TEMPMAIL_CONFIG=str(config_file))
    env.pop("DATABASE_URL", None)
    proc = subprocess.run([str(ROOT / ".venv/bin/flask"), "--app", "app", "smtpd", "--port", "0"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "lmtp.group: no such group 'no-such-group-x'" in proc.stderr
    assert not (socket_dir / "lmtp.sock").exists()


# -- the log filter ---------------------------------------------------------

def capture(name: str) -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    logger = logging.getLogger(name)
    logger.handlers, logger.propagate, logger.level = [handler], False, logging.INFO
    logsafe.install([name])
    return logger, out


def test_log_filter_escapes_controls_in_messages_arguments_and_tracebacks():
    logger, out = capture("tempmail.test.logsafe")
    hostile = "x\nINFO tempmail.mail accepted id=1\r\x1b[2J\x85\u2028\udcff\x7f"
    logger.info("rejected from=<%s> %d", hostile, 5)
    logger.info(hostile)
    try:
        raise ValueError(hostile)
    except ValueError:
        logger.exception("failed for %s", hostile)
    lines = out.getvalue().splitlines()  # splits at NEL and U+2028 too
    records = [line for line in lines if not line.startswith(logsafe.CONTINUATION)]
    assert records == [
        "INFO tempmail.test.logsafe rejected from=<x\\x0aINFO tempmail.mail accepted id=1"
        "\\x0d\\x1b[2J\\x85\\u2028\\udcff\\x7f> 5",
        "INFO tempmail.test.logsafe x\\x0aINFO tempmail.mail accepted id=1\\x0d\\x1b[2J\\x85\\u2028\\udcff\\x7f",
        "ERROR tempmail.test.logsafe failed for x\\x0aINFO tempmail.mail accepted id=1"
        "\\x0d\\x1b[2J\\x85\\u2028\\udcff\\x7f"]
    assert lines[3] == logsafe.CONTINUATION + "Traceback (most recent call last):"
    # The exception's own line break survives only as an indented continuation.
    assert lines[-2:] == [logsafe.CONTINUATION + "ValueError: x", logsafe.CONTINUATION
                          + "INFO tempmail.mail accepted id=1\\x0d\\x1b[2J\\x85\\u2028\\udcff\\x7f"]
    assert all(ord(c) >= 0x20 for c in out.getvalue().replace("\n", ""))


def test_log_filter_is_installed_once_per_handler_and_keeps_reply_text_readable():
    logger, out = capture("tempmail.test.logsafe2")
    logsafe.install(["tempmail.test.logsafe2"])
    assert logger.handlers[0].filters.count(logsafe.SAFE_FILTER) == 1
    logger.info("path C:\\dir é %s", "ü")
    assert out.getvalue() == "INFO tempmail.test.logsafe2 path C:\\dir é ü\n"
    assert logsafe.escape("Ünï\t", ascii_only=True) == "\\xdcn\\xef\\x09"


ENVELOPE_ARGS = ["<a@b.example>", "<a@b.example> SIZE=2048", "<a@b.example>\tBODY=8BITMIME", "<a.b+c@x-y.example>",
                 "<a@b.example>SIZE=1", "<>", "a@b.example", " <a@b.example>", "<a..b@x.example>", "<a@localhost>",
                 "<\"q q\"@x.example>", "<a@b.example", "<@relay.example:a@b.example>", "<Ünï@x.example>",
                 "<a@[127.0.0.1]>", "<a@b.example> ", "<.a@b.example>", "<a@b.example.>", "<a @b.example>",
                 "<a@b.example> (comment) SIZE=1", "<a@b.example>  \t SIZE=1 BODY=7BIT"]


@pytest.mark.parametrize("arg", ENVELOPE_ARGS)
def test_envelope_addresses_read_as_the_stock_parser_reads_them(arg):
    """The daemon's own reading of a plain ``<user@example.com>`` gives what
    Salmon's stock parser gives (address and rest of the line); the others go
    to the stock parser itself."""
    channel = object.__new__(smtpserver.SMTPChannel)
    try:
        stock = smtpserver.salmon_server.SMTPChannel._getaddr(channel, arg)
    except Exception as exc:  # the session answers 501 for these (found_terminator)
        with pytest.raises(type(exc)):
            smtpserver.SMTPChannel._getaddr(channel, arg)
        return
    assert smtpserver.SMTPChannel._getaddr(channel, arg) == (stock[0], str(stock[1]))
