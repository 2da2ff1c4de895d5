"""One recipient policy: whatever RCPT accepts, delivery stores (over real
SMTP to the in-process daemon), with catch-all off and on; catch-all obeys
/generate's username rules; ``name+tag`` is delivered to ``name``."""
from __future__ import annotations

import smtplib

import pytest

import mailpolicy
import smtpserver
import storage
from models import Domain, Mailbox, Message, db

LOCAL_PARTS = ["alice", "Alice", "alice+news", "bob", "ab", "a" * 21, "admin", "postmaster",
               "hostmaster", "new.person", "x_y", "nine99", "abuse", "under+", "+tagonly",
               "Ünï", "zoë", "name+ünï"]


@pytest.fixture(params=[False, True], ids=["catch-all off", "catch-all on"])
def served(request, app_factory):
    app = app_factory({"catch_all": request.param})
    with app.app_context():
        Mailbox.create("alice", Domain.by_name("example.com"), 3600)
    server = smtpserver.MailServer(app, "127.0.0.1", 0, purge=False).start()
    yield app, server, request.param
    server.stop()


def rcpt_then_data(port: int, address: str) -> tuple[int, int | None]:
    # Distinct bytes per address: a resent identical message is stored once (dedupe).
    """RCPT's code, and DATA's final code when RCPT was accepted."""
    with smtplib.SMTP("127.0.0.1", port, timeout=20) as conn:
        conn.ehlo("client.test")
        conn.mail("sender@example.org", ["SMTPUTF8"])  # UTF-8 local parts are sent as such
        code, _ = conn.rcpt(address)
        if code != 250:
            return code, None
        code_data, _ = conn.data(f"Subject: policy {address!r}\r\n\r\nbody\r\n".encode("ascii", "replace"))
        return code, code_data


def stored_for(app, address: str) -> int:
    rcpt = mailpolicy.parse_recipient(address)
    with app.app_context():
        box = Mailbox.find_live(rcpt.address)
        if box is None:
            return 0
        return len(list(db.session.scalars(box.messages_query())))


def test_rcpt_accepted_iff_stored_after_data(served):
    app, server, catch_all = served
    for local in LOCAL_PARTS:
        address = f"{local}@example.com"
        before = stored_for(app, address)
        rcpt, data = rcpt_then_data(server.port, address)
        after = stored_for(app, address)
        assert rcpt in (250, 550), (local, rcpt)
        assert (rcpt == 250) == (data == 250) == (after == before + 1), (local, rcpt, data)
        expected = local.split("+")[0].lower() == "alice" or (
            catch_all and mailpolicy.parse_recipient(address).local.isascii()
            and 3 <= len(local.split("+")[0]) <= 20 and local.split("+")[0].isalnum()
            and local.split("+")[0].lower() not in app.config["TEMPMAIL"]["reserved_usernames"])
        assert (rcpt == 250) == expected, (local, catch_all)
    assert rcpt_then_data(server.port, "alice@elsewhere.org") == (550, None)


def test_catch_all_mailboxes_are_made_like_generate(app_factory):
    app = app_factory({"catch_all": True})
    with app.app_context():
        rcpt = mailpolicy.check_recipient("Fresh42@example.com")
        (box, tag), = mailpolicy.mailboxes_for([rcpt.given], mailpolicy.Lookups())
        assert (box.address, box.origin, tag) == ("fresh42@example.com", "catch-all", None)
        for reserved in ("admin", "postmaster", "hostmaster", "webmaster", "abuse"):
            with pytest.raises(mailpolicy.UnknownRecipient):
                mailpolicy.check_recipient(f"{reserved}@example.com")


def test_subaddress_is_delivered_to_its_mailbox_with_the_tag(app):
    import mailhandler
    with app.app_context():
        Mailbox.create("tagged", Domain.by_name("example.com"), 3600)
        msgs = mailhandler.deliver(b"Subject: t\r\n\r\nx", ["Tagged+Signup-7@example.com",
                                                            "tagged+login@example.com"])
        assert sorted(m.tag for m in msgs) == ["login", "signup-7"]
        assert {m.mailbox.address for m in msgs} == {"tagged@example.com"}
        assert db.session.query(Message).count() == 2


def test_a_live_answer_at_rcpt_is_reused_for_a_second_and_delivery_decides_again(app_factory, monkeypatch):
    """RCPT reuses a "live" answer for up to a second (mailpolicy.LIVE_RCPT_SECONDS);
    a refusal is never reused, so a mailbox created a moment ago is found at
    once; a mailbox deleted within that second gets RCPT 250, then 550 after
    DATA from delivery's own decision, and nothing is stored."""
    monkeypatch.setattr(mailpolicy, "LIVE_RCPT_SECONDS", 60)  # "within the second" on any machine
    app = app_factory()
    server = smtpserver.MailServer(app, "127.0.0.1", 0, purge=False).start()
    try:
        assert rcpt_then_data(server.port, "fresh@example.com") == (550, None)
        with app.app_context():
            Mailbox.create("fresh", Domain.by_name("example.com"), 3600)
        assert rcpt_then_data(server.port, "fresh@example.com") == (250, 250)  # the refusal was not kept
        with app.app_context():
            storage.commit_removal(Mailbox.find_live("fresh@example.com").delete())
        assert rcpt_then_data(server.port, "Fresh@example.com") == (250, 550)  # RCPT from the second-old answer
        assert stored_for(app, "fresh@example.com") == 0
    finally:
        server.stop()
