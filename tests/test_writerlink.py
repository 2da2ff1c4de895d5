"""The frames between the receivers and the writer process (writerlink.py):
whatever the bytes arrive in, each job and reply comes out whole and equal
to what went in, big messages included; the daemon's own tests
(test_daemon_processes.py, the adversarial and webhook suites) run the
link itself between real processes."""
from __future__ import annotations

import os
import random
import socket
import subprocess
import sys

import pytest

import smtpserver
import writerlink


def job(raw: bytes, recipients: list[str], sender: str = "s@example.org") -> smtpserver.Job:
    return smtpserver.Job(bytearray(raw), recipients, sender, "127.0.0.1:4242", channel=None)


def test_jobs_come_out_whole_however_the_bytes_are_cut():
    rng = random.Random(7)
    jobs = [job(b"Subject: small\r\n\r\nbody\r\n", ["a@example.com"]),
            job(b"", ["b@example.com", "c@example.com"], sender=""),
            job(bytes(rng.getrandbits(8) for _ in range(300_000)), ["\u00fcn\u00efcode@b\u00fccher.example"],
                sender="\u00e9t\u00e9@example.org"),
            job(b"x" * 70_000, ["d@example.com"])]
    # what a receiver sends with a message it parsed: every type parse_message gives
    jobs[0].fields = {"subject": "small \u00e9", "date": None, "body_text": "body", "attachments": [
        {"filename": "a.bin", "data": bytes(range(256)), "content_type": "application/octet-stream",
         "content_id": None, "inline": False}]}
    jobs[3].fields = {"subject": "", "attachments": []}
    jobs[0].sha, jobs[3].sha = "ab" * 32, "cd" * 32
    wire = b"".join(piece for n, one in enumerate(jobs) for piece in writerlink.encode_job(n + 1, one))
    frames, out = writerlink.Frames(), []
    start = 0
    while start < len(wire):
        end = start + rng.choice([1, 7, 100, 4096, 65536, 200_000])
        frames.feed(wire[start:end])
        out.extend(frames.jobs())
        start = end
    assert [o[0] for o in out] == [1, 2, 3, 4]
    for (_id, queue_id, sender, peer, recipients, (fields, sha), raw), one in zip(out, jobs):
        assert (queue_id, sender, peer, recipients, fields, sha, bytes(raw)) == \
            (one.queue_id, one.mail_from, one.peer, one.recipients, one.fields, one.sha, bytes(one.raw))
    assert not frames.buf


def test_a_big_message_alone_is_sent_and_kept_without_a_copy():
    big = job(b"y" * 200_000, ["a@example.com"])
    head, raw = writerlink.encode_job(9, big)
    assert raw is big.raw  # not joined into a new buffer
    frames = writerlink.Frames()
    frames.feed(head + raw)
    ((job_id, *_rest, kept),) = list(frames.jobs())
    assert job_id == 9 and len(kept) == 200_000


def test_replies_come_out_whole():
    wire = writerlink.encode_reply(1, "250 2.0.0 Ok: queued as ABC") + \
        writerlink.encode_reply(2, "451 4.3.0 Temporary failure storing the message, try again later") + \
        writerlink.encode_reply(3, "250 caf\u00e9")
    frames, out = writerlink.Frames(), []
    for i in range(0, len(wire), 5):
        frames.feed(wire[i:i + 5])
        out.extend(frames.replies())
    assert out == [(1, "250 2.0.0 Ok: queued as ABC"),
                   (2, "451 4.3.0 Temporary failure storing the message, try again later"), (3, "250 caf\u00e9")]


def test_a_receiver_parses_for_the_writer_as_smtp_receiver_parse_says(app):
    """``smtp.receiver_parse``: "always", "never", or "auto": only while two
    or more of the receiver's messages wait for the writer; never a message
    over 1 MiB, which goes as it came (the daemon tests store what a
    receiver parsed, test_daemon_processes.py)."""
    server = smtpserver.MailServer(app, "127.0.0.1", 0, purge=False, writer_address="\0tempmail-test-none")
    try:
        small = job(b"Subject: small\r\n\r\nbody\r\n", ["a@example.com"])
        big = job(b"x" * (smtpserver.PARSE_IN_RECEIVER_BELOW + 1), ["a@example.com"])
        for mode, waiting, parses in [("auto", 0, False), ("auto", 1, False), ("auto", 2, True),
                                      ("auto", 5, True), ("always", 0, True), ("never", 5, False)]:
            server.receiver_parse = mode
            server.link.inflight = dict.fromkeys(range(waiting))
            assert server.parses_here(small) is parses, (mode, waiting)
            assert server.parses_here(big) is False
    finally:
        server.link.inflight = {}
        server.stop()
    assert app.config["TEMPMAIL"]["smtp"]["receiver_parse"] == "auto"  # as shipped


NOBODY_CONNECTS = """
import os, socket, sys
os.setgid(65534)
os.setuid(65534)
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect("\\0" + sys.argv[1])  # abstract namespace: no file to guard it
sock.settimeout(20)
print("closed" if sock.recv(1) == b"" else "open")
"""


def test_the_writer_takes_connections_only_from_its_own_user(caplog):
    """The writer's socket is in the abstract namespace, where any local
    user could connect: a process of another user (here ``nobody``) is
    refused and closed at once (``SO_PEERCRED``); one of our own is taken."""
    if os.geteuid() != 0:
        pytest.fail("this test changes to another user (nobody) and must run as root")
    address = writerlink.new_address()
    listener = writerlink.listen(address)
    service = writerlink.WriterService(listener, smtpserver.Job, lambda jobs: None, 64, 1 << 20, lambda: None, 0)
    try:
        stranger = subprocess.Popen([sys.executable, "-c", NOBODY_CONNECTS, address[1:]], stdout=subprocess.PIPE,
                                    text=True)
        service.accept()  # blocks until it connects
        assert stranger.communicate(timeout=30)[0].strip() == "closed"
        assert "refused a connection to the writer from uid 65534" in caplog.text and not service.frames
        ours = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.connect(address)
        service.accept()
        assert len(service.frames) == 1
        ours.close()
    finally:
        for conn in list(service.frames):
            service.drop(conn)
        listener.close()
