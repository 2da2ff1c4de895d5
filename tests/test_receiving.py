"""The mail daemon over real connections: smtplib against the in-process
MailServer (and `flask smtpd` in a subprocess), LMTP over a Unix socket,
and the stored result read back through the api.php routes."""
from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import sys
from email.message import EmailMessage
from pathlib import Path

import pytest

import smtpserver
from conftest import ROOT, free_port, wait_for_port
from models import Domain, Mailbox, db

DATA = Path(__file__).parent / "data"


@pytest.fixture
def mail_server(app):
    server = smtpserver.MailServer(app, "127.0.0.1", 0).start()
    yield server
    server.stop()


def make_boxes(app, *names: str) -> None:
    with app.app_context():
        for name in names:
            Mailbox.create(name, Domain.by_name("example.com"), 3600)


def smtp(server) -> smtplib.SMTP:
    return smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.test", timeout=20)


def inbox(client, address: str) -> list[dict]:
    resp = client.get(f"/api.php/inbox/{address}")
    assert resp.status_code == 200, resp.get_json()
    return resp.get_json()["emails"]


def only_message(client, address: str) -> dict:
    (summary,) = inbox(client, address)
    return client.get(f"/api.php/email/{summary['id']}").get_json()


def reply_codes_until_bye(sock) -> list[bytes]:
    """Read a pipelined session's replies up to ``221 Bye``; the final line
    code of each reply (multi-line EHLO answers count once)."""
    replies = b""
    while not replies.endswith(b"221 Bye\r\n"):
        chunk = sock.recv(4096)
        assert chunk, replies
        replies += chunk
    return [line[:3] for line in replies.split(b"\r\n") if line[3:4] == b" "]


def test_message_over_smtp_shows_in_api_with_attachments(app, client, mail_server):
    make_boxes(app, "alice")
    blob = os.urandom(150_000) + b"\r\n.\r\n\x00"  # binary, with a bare end-of-data lookalike
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "Ann <ann@example.org>", "alice@example.com", "Files"
    msg.set_content("see attached\n.leading dot line\n")
    msg.add_alternative("<p>see <b>attached</b></p>", subtype="html")
    msg.add_attachment(blob, maintype="application", subtype="octet-stream", filename="résumé 2024.bin")
    with smtp(mail_server) as conn:
        assert conn.send_message(msg) == {}
    data = only_message(client, "alice@example.com")
    email = data["email"]
    assert (email["from_email"], email["from_name"], email["subject"]) == ("ann@example.org", "Ann", "Files")
    assert email["body_text"] == "see attached\n.leading dot line\n"
    assert "<b>attached</b>" in email["body_html"]
    (att,) = data["attachments"]
    assert (att["filename"], att["size"]) == ("résumé 2024.bin", len(blob))
    download = client.get(att["file_path"])
    assert download.status_code == 200 and download.data == blob


def test_html_only_inline_image_and_cpython_samples(app, client, mail_server):
    make_boxes(app, "bob")
    html = EmailMessage()
    html["From"], html["Subject"] = "h@example.org", "=?utf-8?q?Caf=C3=A9?="
    html.set_content('<p>Logo: <img src="cid:logo@x"></p>', subtype="html")
    html.add_related(b"GIF89a...", "image", "gif", cid="<logo@x>")
    samples = sorted((DATA / "cpython").glob("msg_*.txt"))
    with smtp(mail_server) as conn:
        conn.sendmail("h@example.org", ["bob@example.com"], html.as_bytes())
        for path in samples:
            assert conn.sendmail("", ["bob@example.com"], path.read_bytes()) == {}
    emails = inbox(client, "bob@example.com")
    assert len(emails) == 1 + len(samples) == 11
    first = client.get(f"/api.php/email/{emails[0]['id']}").get_json()
    assert first["email"]["subject"] == "Café" and first["email"]["body_text"] == "Logo:"
    (image,) = first["attachments"]
    assert image["content_type"] == "image/gif"
    with app.app_context():
        from models import Attachment
        stored = Attachment.by_legacy_id(str(image["id"]))
        assert (stored.content_id, stored.inline) == ("logo@x", True)


def test_legacy_charsets_over_smtp(app, client, mail_server):
    make_boxes(app, "carol")
    samples = {"iso-8859-1": "Grüße aus Köln", "windows-1252": "“quoted” – €", "koi8-r": "Привет, мир",
               "shift_jis": "こんにちは世界", "gb2312": "你好，世界"}
    with smtp(mail_server) as conn:
        for charset, text in samples.items():
            raw = (f"From: x@example.org\r\nSubject: {charset}\r\nMIME-Version: 1.0\r\n"
                   f"Content-Type: text/plain; charset={charset}\r\n"
                   "Content-Transfer-Encoding: 8bit\r\n\r\n").encode() + text.encode(charset) + b"\r\n"
            conn.sendmail("x@example.org", ["carol@example.com"], raw)
    for summary in inbox(client, "carol@example.com"):
        body = client.get(f"/api.php/email/{summary['id']}").get_json()["email"]["body_text"]
        assert body.strip() == samples[summary["subject"]]


def test_one_message_to_three_mailboxes_and_refusals(app, client, mail_server):
    make_boxes(app, "dan", "eve", "fay")
    with smtp(mail_server) as conn:
        refused = conn.sendmail("s@example.org", ["dan@example.com", "EVE@example.com", "fay@example.com",
                                                  "eve@example.com", "ghost@example.com",
                                                  "dan@elsewhere.org"], b"Subject: all\r\n\r\nhi\r\n")
    assert refused["ghost@example.com"][0] == 550 and refused["ghost@example.com"][1].startswith(b"5.1.1")
    assert refused["dan@elsewhere.org"][0] == 550 and refused["dan@elsewhere.org"][1].startswith(b"5.7.1")
    for name in ("dan", "eve", "fay"):
        assert [m["subject"] for m in inbox(client, f"{name}@example.com")] == ["all"]
    with smtp(mail_server) as conn:
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            conn.sendmail("s@example.org", ["ghost@example.com"], b"Subject: x\r\n\r\nx\r\n")


def test_size_limits_keep_the_session_usable(app_factory, client):
    app = app_factory({"max_message_bytes": 20_000})
    make_boxes(app, "gus")
    server = smtpserver.MailServer(app, "127.0.0.1", 0).start()
    try:
        with smtp(server) as conn:
            with pytest.raises(smtplib.SMTPSenderRefused) as announced:
                conn.sendmail("s@example.org", ["gus@example.com"], b"Subject: big\r\n\r\n" + b"x" * 30_000)
            assert announced.value.smtp_code == 552 and b"5.3.4" in announced.value.smtp_error
            conn.rset()
            conn.mail("s@example.org")  # no SIZE=: the limit must hold at the end of DATA
            conn.rcpt("gus@example.com")
            code, text = conn.data(b"Subject: big\r\n\r\n" + b"y" * 30_000)
            assert (code, text[:5]) == (552, b"5.3.4")
            assert conn.sendmail("s@example.org", ["gus@example.com"], b"Subject: small\r\n\r\nok\r\n") == {}
        with app.test_client() as web:
            assert [m["subject"] for m in inbox(web, "gus@example.com")] == ["small"]
    finally:
        server.stop()


def test_store_failure_answers_451_and_retry_arrives(app, client, mail_server):
    make_boxes(app, "hal")
    app.config["FAIL_NEXT_STORE"] = 1
    raw = b"Subject: retry me\r\n\r\nbody\r\n"
    with smtp(mail_server) as conn:
        with pytest.raises(smtplib.SMTPDataError) as failed:
            conn.sendmail("s@example.org", ["hal@example.com"], raw)
        assert failed.value.smtp_code == 451
        assert inbox(client, "hal@example.com") == []
        assert conn.sendmail("s@example.org", ["hal@example.com"], raw) == {}
    assert [m["subject"] for m in inbox(client, "hal@example.com")] == ["retry me"]


def test_pipelined_transactions_and_garbage_commands(app, client, mail_server):
    make_boxes(app, "ida")
    script = (b"EHLO c\r\nMAIL FROM:<>\r\nRCPT TO:<ida@example.com>\r\nDATA\r\n"
              b"Subject: one\r\n\r\n..dot\r\n.\r\n"
              b"MAIL FROM:<a@b.c>\r\nRCPT TO:<ida@example.com>\r\nDATA\r\n.\r\n"
              b"RCPT TO:<broken\r\n\xff\xfe\r\nQUIT\r\n")
    with socket.create_connection(("127.0.0.1", mail_server.port), timeout=20) as sock:
        sock.sendall(script)
        codes = reply_codes_until_bye(sock)
    assert codes == [b"220", b"250", b"250", b"250", b"354", b"250", b"250", b"250", b"354", b"250",
                     b"503", b"501", b"221"]
    subjects = [m["subject"] for m in inbox(client, "ida@example.com")]
    assert subjects == ["one", ""]
    first = inbox(client, "ida@example.com")[0]["id"]
    assert client.get(f"/api.php/email/{first}").get_json()["email"]["body_text"] == ".dot\n"


def test_lmtp_unix_socket_unstuffs_dots_and_answers_per_recipient(app, client, tmp_path):
    make_boxes(app, "jon", "kim")
    path = str(tmp_path / "lmtp.sock")
    server = smtpserver.MailServer(app, "127.0.0.1", 0, lmtp_socket=path).start()
    try:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(20)
            sock.connect(path)
            sock.sendall(b"LHLO mx\r\nMAIL FROM:<s@example.org>\r\nRCPT TO:<jon@example.com>\r\n"
                         b"RCPT TO:<nobody@example.com>\r\nRCPT TO:<kim@example.com>\r\nDATA\r\n"
                         b"Subject: lmtp\r\n\r\n..starts with a dot\r\n...two\r\n.\r\nQUIT\r\n")
            codes = reply_codes_until_bye(sock)
        assert codes == [b"220", b"250", b"250", b"250", b"550", b"250", b"354", b"250", b"250", b"221"]
        lmtp = smtplib.LMTP(path, local_hostname="mx")
        lmtp.sendmail("s@example.org", ["kim@example.com"], b"Subject: again\r\n\r\nx\r\n")
        lmtp.quit()
    finally:
        server.stop()
    assert not os.path.exists(path)
    body = only_message(client, "jon@example.com")["email"]["body_text"]
    assert body == ".starts with a dot\n..two\n"
    assert [m["subject"] for m in inbox(client, "kim@example.com")] == ["lmtp", "again"]


def test_connection_limit_and_idle_timeout(app_factory):
    app = app_factory({"smtp": {"max_connections": 2, "idle_timeout": 0.2}})
    server = smtpserver.MailServer(app, "127.0.0.1", 0).start()
    try:
        first, second = smtp(server), smtp(server)
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as third:
            assert third.recv(100).startswith(b"421 4.7.0")
        # Both sessions sit idle: the daemon says goodbye and closes them.
        first.sock.settimeout(20)
        assert first.getreply()[0] == 421
        second.close()
        first.close()
    finally:
        server.stop()


def test_flask_smtpd_subprocess_without_deprecation_warnings(app, client, config_file, tmp_path):
    make_boxes(app, "liz")
    port = free_port()
    env = dict(os.environ, TEMPMAIL_CONFIG=str(config_file), PYTHONWARNINGS="error::DeprecationWarning")
    proc = subprocess.Popen([sys.executable, "-W", "error::DeprecationWarning", "-m", "flask", "--app", "app",
                             "smtpd", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port)
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=20) as conn:
            conn.sendmail("s@example.org", ["liz@example.com"], b"Subject: daemon\r\n\r\nhello\r\n")
            with pytest.raises(smtplib.SMTPRecipientsRefused):
                conn.sendmail("s@example.org", ["nope@example.com"], b"Subject: no\r\n\r\nx\r\n")
    finally:
        proc.terminate()
        output = proc.communicate(timeout=30)[0].decode()
    assert proc.returncode == 0, output
    assert "DeprecationWarning" not in output and "Traceback" not in output, output
    assert output.count("accepted id=") == 1 and output.count("rejected 550 5.1.1") == 1, output
    assert [m["subject"] for m in inbox(client, "liz@example.com")] == ["daemon"]
