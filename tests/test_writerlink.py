"""The frames between the receivers and the writer process (writerlink.py):
whatever the bytes arrive in, each job and reply comes out whole and equal
to what went in, big messages included; the daemon's own tests
(test_daemon_processes.py, the adversarial and webhook suites) run the
link itself between real processes."""
from __future__ import annotations

import random

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
    wire = b"".join(piece for n, one in enumerate(jobs) for piece in writerlink.encode_job(n + 1, one))
    frames, out = writerlink.Frames(), []
    start = 0
    while start < len(wire):
        end = start + rng.choice([1, 7, 100, 4096, 65536, 200_000])
        frames.feed(wire[start:end])
        out.extend(frames.jobs())
        start = end
    assert [o[0] for o in out] == [1, 2, 3, 4]
    for (_id, queue_id, sender, peer, recipients, fields, raw), one in zip(out, jobs):
        assert (queue_id, sender, peer, recipients, fields, bytes(raw)) == \
            (one.queue_id, one.mail_from, one.peer, one.recipients, one.fields, bytes(one.raw))
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
