"""What a client writes cannot break the replies or the log (issue 12, items
3 and 8), against the real ``flask smtpd`` subprocess:

* a refusal that quotes a non-ASCII address (at RCPT, or after DATA) goes
  out escaped, and the daemon keeps answering everyone afterwards (the old
  daemon raised UnicodeEncodeError in the wake-up handler and never sent
  another reply after DATA);
* a command holding a bare CR or LF is refused whole, no reply carries a
  bare LF, and no log line can be forged.
"""
from __future__ import annotations

import re
import socket

from models import Domain, Mailbox, db

from .helpers import Daemon, build_message, record, smtp_session, write_config

ORDINARY = 100
BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")  # a CR or LF outside a CRLF pair
FORGED = "2031-01-01 00:00:00,000 tempmail.mail INFO accepted id=1 from=<boss@example.com>"


class Client:
    """A raw SMTP session: send lines as bytes, read whole (multi-line) replies."""

    def __init__(self, port: int, timeout: float = 10):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf, self.raw = b"", b""
        self.greeting = self.reply()

    def reply(self) -> bytes:
        """The next complete reply (every line up to the one with a space after the code)."""
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                assert chunk, f"connection closed; got {self.raw!r}"
                self.buf += chunk
                self.raw += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line)
            if line[3:4] != b"-":
                return b"\r\n".join(lines)

    def command(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        self.sock.close()


def ordinary_messages(port: int, rcpt: str) -> int:
    """Send ORDINARY messages, ten per connection; how many got 250 (stops at
    the first that does not, which a daemon that lost its wake-up pipe shows
    as a timeout)."""
    got = 0
    for start in range(0, ORDINARY, 10):
        with smtp_session(port, timeout=10) as conn:
            for n in range(start, start + 10):
                conn.mail("probe@peer.test")
                conn.rcpt(rcpt)
                code, _ = conn.data(build_message(n, rcpt, tag="after"))
                if code != 250:
                    return got
                got += 1
    return got


def non_ascii_refusal(client: Client, rcpt: bytes, before_data=None) -> tuple[str, bytes]:
    """RCPT ``rcpt`` then, if that was accepted, DATA: (where it was refused, the refusal)."""
    assert client.command(b"MAIL FROM:<sender@peer.test>").startswith(b"250")
    answer = client.command(b"RCPT TO:<" + rcpt + b">")
    if not answer.startswith(b"250"):
        return "RCPT", answer
    if before_data:
        before_data()
    assert client.command(b"DATA").startswith(b"354")
    return "DATA", client.command(b"Subject: hi\r\n\r\nbody\r\n.")


def test_non_ascii_refusal_does_not_silence_the_daemon(app, tmp_path):
    """The attack as reported: catch-all on, RCPT <Ünï@example.com>, DATA."""
    with app.app_context():
        Mailbox.create("plain", Domain.by_name("example.com"), 86400)
    config = write_config(app, tmp_path / "conf.json", catch_all=True,
                          smtp={"host": "127.0.0.1", "port": 0})
    daemon = Daemon(config, tmp_path / "smtpd.log").start()
    try:
        client = Client(daemon.port)
        client.command(b"EHLO client.test")
        where, refusal = non_ascii_refusal(client, "Ünï@example.com".encode())
        client.close()
        answered = ordinary_messages(daemon.port, "plain@example.com")
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()
    log = (tmp_path / "smtpd.log").read_text(errors="replace")
    record("SMTP replies", f"catch-all, RCPT <Ünï@example.com>: refused at {where} with {refusal!r}; "
           f"then {answered}/{ORDINARY} ordinary messages got 250")
    # Whether the recipient policy refuses it at RCPT or only after DATA, the
    # refusal is plain ASCII and everyone after it gets their 250.
    assert refusal[:1] in (b"4", b"5") and refusal.isascii() and not BARE.search(refusal)
    assert answered == ORDINARY
    assert "UnicodeEncodeError" not in log and "Traceback" not in log


def test_non_ascii_refusals_at_rcpt_and_after_data(app, tmp_path):
    with app.app_context():
        Mailbox.create("plain", Domain.by_name("example.com"), 86400)
        Mailbox.create("kate", Domain.by_name("example.com"), 86400)
    config = write_config(app, tmp_path / "conf.json", smtp={"host": "127.0.0.1", "port": 0})
    daemon = Daemon(config, tmp_path / "smtpd.log").start()

    def expire_kate():
        with app.app_context():
            db.session.scalar(db.select(Mailbox).filter_by(address="kate@example.com")).delete()
            db.session.commit()
    try:
        client = Client(daemon.port)
        client.command(b"EHLO client.test")
        _, plain = non_ascii_refusal(client, "Ünï@example.com".encode())
        assert client.command(b"RSET").startswith(b"250")
        assert client.command(b"MAIL FROM:<sender@peer.test> SMTPUTF8").startswith(b"250")
        utf8 = client.command("RCPT TO:<Ünï@example.com>".encode())
        assert client.command(b"RSET").startswith(b"250")
        # KELVIN SIGN lower-cases to "k": the address finds the live mailbox
        # kate at RCPT, which is gone by the end of DATA, so the refusal
        # after DATA quotes a non-ASCII address (unless RCPT refuses it).
        where, after_data = non_ascii_refusal(client, "\u212aate@example.com".encode(), expire_kate)
        unknown = client.command(b"NOT\x1b[2JA\xc3\x9cCOMMAND")
        assert client.command(b"QUIT").startswith(b"221")
        client.close()
        answered = ordinary_messages(daemon.port, "plain@example.com")
    finally:
        daemon.stop()
    record("SMTP replies", f"RCPT <Ünï@example.com> unknown: {plain!r} in a plain session, "
           f"{utf8.decode()!r} after MAIL ... SMTPUTF8; <\\u212aate@example.com> whose mailbox went "
           f"before DATA: refused at {where} with {after_data!r}; unknown command with ESC: {unknown!r}; "
           f"then {answered}/{ORDINARY} ordinary messages got 250")
    assert plain.startswith(b"550 5.1.1 ") and b"<\\xdcn\\xef@example.com>" in plain and plain.isascii()
    assert utf8.startswith(b"550 5.1.1 ") and "<Ünï@example.com>".encode() in utf8
    assert after_data[:1] == b"5" and after_data.isascii() and not BARE.search(after_data)
    assert unknown.startswith(b"500 ") and unknown.isascii() and b"\x1b" not in unknown
    assert answered == ORDINARY


def test_bare_line_breaks_cannot_forge_log_lines_or_replies(app, tmp_path):
    config = write_config(app, tmp_path / "conf.json", smtp={"host": "127.0.0.1", "port": 0})
    daemon = Daemon(config, tmp_path / "smtpd.log").start()
    try:
        client = Client(daemon.port)
        client.command(b"EHLO client.test")
        client.command(b"MAIL FROM:<sender@peer.test>")
        forged_lf = client.command(f'RCPT TO:<"x\n{FORGED}\nz"@example.com>'.encode())
        forged_cr = client.command(f'RCPT TO:<"x\r{FORGED}\rz"@example.com>'.encode())
        forged_nel = client.command(f'RCPT TO:<"x\u0085{FORGED}\u2028z"@example.com>'.encode())
        client.command(b"RSET")
        # Not refused by syntax: MAIL's SIZE refusal logs the whole argument.
        size = client.command(f"MAIL FROM:<a@peer.test> SIZE=999999999999 X=\x1b[2J\u2028{FORGED}".encode())
        assert client.command(b"QUIT").startswith(b"221")
        client.close()
    finally:
        daemon.stop()
    log = (tmp_path / "smtpd.log").read_text()
    lines = log.splitlines()  # also splits at NEL and LINE SEPARATOR, as log viewers may
    forged = [line for line in lines if line.startswith(FORGED[:20])]
    record("SMTP replies", f"RCPT with bare LF: {forged_lf[:60]!r}, bare CR: {forged_cr[:60]!r}, "
           f"NEL/LINE SEPARATOR: {forged_nel[:60]!r}; oversize MAIL with ESC: {size[:9]!r}; "
           f"forged log lines: {len(forged)} of {len(lines)}; bare CR/LF in replies: "
           f"{len(BARE.findall(client.raw))}")
    assert forged_lf.startswith(b"501 ") and forged_cr.startswith(b"501 ") and forged_nel.startswith(b"501 ")
    assert size.startswith(b"552 5.3.4")
    assert not BARE.search(client.raw)
    assert forged == []
    assert "\x1b" not in log and "\\x1b[2J\\u2028" + FORGED in log
    assert any("bare CR or LF" in line and "\\x0a" + FORGED in line for line in lines)
