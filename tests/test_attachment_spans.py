"""An attachment of a message whose raw bytes are kept in a row of their own
(``message_sources``) is stored as its span of those bytes, decoded when
read, not as a second copy in a blob (``mailhandler.attachment_rows``,
``storage.download_attachment``; bench/README "Session 10").

What it is held to, on both databases and on every store: each attachment
reads back and downloads (api.php, the User API, the web page) as the parse
decoded it; an attachment that cannot be a span (uuencode, a message stored
for several mailboxes, the all-files store) is a blob as before; a deleted
message leaves nothing; ``find_missing`` reports nothing; the daemon's
receivers hand the spans they found to the writer."""
from __future__ import annotations

import base64
import binascii
import json
import marshal
import os
import quopri
import smtplib

from sqlalchemy import func, select

import mailhandler
import models
import retention
import storage
from models import Blob, Domain, Mailbox, Message, MessageSource, db
from test_api_v1 import Api, make_user
from test_daemon_processes import two_receivers, whole_family
from test_storage import STORES, assert_counts_exact, blob_backend, nothing_stored, store_app  # noqa: F401
from test_web import page_address

BINARY = os.urandom(30_000)
CSV = "".join(f"{i};Zoë;Øresund;{'x' * 60}\r\n" for i in range(40)).encode("utf-8")
NOTES = "".join(f"note {i}: {'plain seven-bit text ' * 3}\r\n" for i in range(40)).encode("ascii")
PICTURE = os.urandom(4_000)
UU = b"uuencoded bytes " * 10


def lines(data: bytes) -> bytes:
    """Base64 in 76-character lines, CRLF-ended."""
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def span_message(subject: str = "spans") -> bytes:
    """A ~60 KB multipart message: a text body, then attachments in base64,
    quoted-printable, 7bit, an inline base64 image and one uuencoded."""
    uu = b"begin 644 old.bin\r\n" + b"".join(
        binascii.b2a_uu(UU[i:i + 45]).replace(b"\n", b"\r\n") for i in range(0, len(UU), 45)) + b"`\r\nend\r\n"
    parts = [
        b"Content-Type: text/plain; charset=utf-8\r\n\r\nThe files are attached.\r\n",
        b"Content-Type: application/octet-stream; name=\"data.bin\"\r\nContent-Disposition: attachment; "
        b"filename=\"data.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\n" + lines(BINARY),
        b"Content-Type: text/csv; charset=utf-8\r\nContent-Disposition: attachment; filename=\"table.csv\"\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
        + quopri.encodestring(CSV.replace(b"\r\n", b"\n")).replace(b"\n", b"\r\n"),
        b"Content-Type: text/plain\r\nContent-Disposition: attachment; filename=\"notes.txt\"\r\n"
        b"Content-Transfer-Encoding: 7bit\r\n\r\n" + NOTES,
        b"Content-Type: image/png\r\nContent-ID: <pic@example.org>\r\nContent-Disposition: inline\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + lines(PICTURE),
        b"Content-Type: application/octet-stream; name=\"old.bin\"\r\nContent-Disposition: attachment; "
        b"filename=\"old.bin\"\r\nContent-Transfer-Encoding: x-uuencode\r\n\r\n" + uu,
    ]
    head = (f"From: Sender <sender@example.org>\r\nTo: keeper@example.com\r\nSubject: {subject}\r\n"
            "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"XyZ\"\r\n\r\n").encode()
    return head + b"".join(b"--XyZ\r\n" + p + b"\r\n" for p in parts) + b"--XyZ--\r\n"


def decoded(raw: bytes) -> dict:
    """Each attachment's bytes as ``parse_message`` decodes them, by file name."""
    return {a["filename"]: a["data"] for a in mailhandler.parse_message(raw)["attachments"]}


def new_box(name: str) -> Mailbox:
    return Mailbox.create(name, Domain.by_name("example.com"), 3600)


def test_the_parse_finds_each_span_and_it_decodes_to_the_bytes():
    raw = span_message()
    found = {a["filename"]: a for a in mailhandler.parse_message(raw)["attachments"]}
    want = {"data.bin": BINARY, "table.csv": CSV, "notes.txt": NOTES, "old.bin": UU}
    assert {name: found[name]["data"] for name in want} == want
    codecs = {name: a["span"][2] for name, a in found.items() if "span" in a}
    assert codecs == {"data.bin": "base64", "table.csv": "quoted-printable", "notes.txt": "7bit",
                      next(n for n in found if n not in want): "base64"}  # the inline image
    # The span is the part's body as received (the line break before the
    # boundary line belongs to the boundary).
    start, end, _codec = found["data.bin"]["span"]
    assert raw[start:end] == lines(BINARY)


def test_a_shipped_parse_carries_spans_without_their_bytes(store_app, blob_backend):
    """What a receiver sends the writer (``shipped``): a span's decoded bytes
    stay behind, only their size goes; the writer stores the span, or, for a
    message it must keep as a blob after all, reads the bytes back from it."""
    raw = span_message("shipped")
    want = decoded(raw)
    fields = mailhandler.shipped(mailhandler.parse_message(raw))
    parts = {a["filename"]: a for a in fields["attachments"]}
    assert {name for name, a in parts.items() if "data" in a} == {"old.bin"}  # uuencoded: no span
    assert {name: a["size"] for name, a in parts.items() if "span" in a} == {
        name: len(data) for name, data in want.items() if name != "old.bin"}
    assert len(marshal.dumps(fields)) < len(marshal.dumps(mailhandler.parse_message(raw))) - len(BINARY)
    with store_app.app_context():
        kept = mailhandler.deliver(raw, [new_box("own").address], fields=fields)
        shared = mailhandler.deliver(raw, [new_box("one").address, new_box("two").address], fields=fields)
        for msg in kept + shared:
            msg = db.session.get(Message, msg.id)
            assert any(a.in_source for a in msg.attachments) == (msg in kept and blob_backend != "filesystem")
            assert {a.filename: (a.size, storage.read_attachment(a)) for a in msg.attachments} == {
                name: (len(data), data) for name, data in want.items()}
        assert_counts_exact()


def test_attachments_of_a_message_in_its_own_row_are_spans_of_it(store_app, blob_backend):
    raw = span_message()
    want = decoded(raw)
    with store_app.app_context():
        (msg,) = mailhandler.deliver(raw, [new_box("keeper").address])
        msg = db.session.get(Message, msg.id)
        in_row = storage.own_source(msg.id) is not None
        assert in_row == (blob_backend != "filesystem")
        spans = {a.filename for a in msg.attachments if a.in_source}
        assert spans == ((set(want) - {"old.bin"}) if in_row else set())
        assert {a.filename: storage.read_attachment(a) for a in msg.attachments} == want
        # Only the uuencoded one (and, without a row, the raw bytes) is a blob.
        blob_shas = set(db.session.scalars(select(Blob.sha256)))
        assert blob_shas == {storage.digest(UU)} | (set() if in_row else
                                                   {storage.digest(d) for d in want.values()} | {msg.raw_sha256})
        assert all(a.sha256 == models.SPAN_SHA for a in msg.attachments if a.in_source)
        assert retention.find_missing() == {"messages": [], "attachments": []}
        stats = retention.storage_stats()  # flask stats, and the stored-bytes gauge
        assert stats["stored_bytes"] == stats["blob_bytes"] + stats["source_bytes"]
        assert (stats["source_bytes"], stats["blob_bytes"]) == ((len(raw), len(UU)) if in_row else
                                                                (0, len(raw) + sum(map(len, want.values()))))
        print(f"\n[spans {blob_backend}] a {len(raw):,}-byte message: {len(spans)} of {len(want)} attachments "
              f"kept as spans, {len(blob_shas)} blobs")
        models.delete_message_rows([msg.id])
        db.session.commit()
        storage.discard([])
        retention.remove_orphans(grace_seconds=0)
        assert nothing_stored(store_app)


def test_a_message_for_several_mailboxes_keeps_its_attachments_as_blobs(store_app, blob_backend):
    """Its bytes are one shared blob (SECURITY.md 8a), so no row of its own to point into."""
    raw = span_message("shared")
    with store_app.app_context():
        msgs = mailhandler.deliver(raw, [new_box("one").address, new_box("two").address])
        for msg in msgs:
            msg = db.session.get(Message, msg.id)
            assert not any(a.in_source for a in msg.attachments)
            assert {a.filename: storage.read_attachment(a) for a in msg.attachments} == decoded(raw)
        assert db.session.scalar(select(func.count()).select_from(MessageSource)) == 0


def test_reparse_keeps_spans_and_bytes(store_app, blob_backend):
    raw = span_message("again")
    with store_app.app_context():
        (msg,) = mailhandler.deliver(raw, [new_box("reparse").address])
        msg_id = msg.id
    result = store_app.test_cli_runner().invoke(args=["reparse", "--id", str(msg_id)])
    assert result.exit_code == 0, result.output
    with store_app.app_context():
        msg = db.session.get(Message, msg_id)
        assert {a.filename: storage.read_attachment(a) for a in msg.attachments} == decoded(raw)
        assert any(a.in_source for a in msg.attachments) == (blob_backend != "filesystem")
        assert_counts_exact()  # every blob counts exactly its users, and none is left over


def test_a_span_downloads_through_every_front(app_factory):
    """api.php's file path, the User API's attachment URL and the web page's
    link give the attachment's bytes, with the same guarded headers as a
    blob; the page of another visitor finds none of them."""
    app = app_factory({"storage": STORES["inline"]})
    client, page, stranger = app.test_client(), app.test_client(), app.test_client()
    api = Api(client, make_user(app))
    addresses = [client.get("/api.php/generate?username=spans").get_json()["email"],
                 api.post("/api/emails").get_json()["data"]["email"], page_address(page)]
    raw = span_message("fronts")
    want = decoded(raw)
    with app.app_context():
        msgs = [db.session.get(Message, mailhandler.deliver(raw, [address])[0].id) for address in addresses]
        atts = [{a.filename: a.id for a in msg.attachments if a.in_source} for msg in msgs]
        legacy_id, public_id, msg_id = msgs[0].legacy_id, msgs[1].public_id, msgs[2].id
    assert all(set(found) == set(want) - {"old.bin"} for found in atts)
    listed = client.get(f"/api.php/email/{legacy_id}").get_json()
    paths = {a["filename"]: a["file_path"] for a in listed["attachments"]}
    for name, att_id in atts[2].items():
        web = f"/web/messages/{msg_id}/attachments/{att_id}"
        for resp in (client.get(paths[name]), api.get(f"/api/messages/{public_id}/attachments/{name}"),
                     page.get(web)):
            assert resp.status_code == 200 and resp.data == want[name], name
            assert resp.headers["Content-Disposition"].startswith("attachment")
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
        assert stranger.get(web).status_code == 404


def test_the_daemon_stores_the_spans_its_receivers_found(app, config_file, tmp_path):
    """Receivers that parse (``smtp.receiver_parse`` always) send the spans
    with the parse; the writer stores them, and they read back exact."""
    config = json.loads(config_file.read_text())
    config["smtp"]["receiver_parse"] = "always"
    config["storage"]["inline_max_bytes"] = 131072
    config_file.write_text(json.dumps(config))
    raws = [span_message(f"daemon {i}") for i in range(3)]
    shared = span_message("daemon shared")
    with app.app_context():
        new_box("second")
    with two_receivers(app, config_file, tmp_path) as (proc, port, _log):
        whole_family(proc)
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as conn:
            for raw in raws:
                conn.sendmail("sender@example.org", ["keeper@example.com"], raw)
            # For two mailboxes: blobs, read back by the writer from the spans it got.
            conn.sendmail("sender@example.org", ["keeper@example.com", "second@example.com"], shared)
    with app.app_context():
        msgs = {m.subject: m for m in db.session.scalars(select(Message))}
        assert len(msgs) == 4
        for i, raw in enumerate(raws):
            msg = msgs[f"daemon {i}"]
            assert storage.read_source(msg) == raw
            assert sum(a.in_source for a in msg.attachments) == 4
            assert {a.filename: storage.read_attachment(a) for a in msg.attachments} == decoded(raw)
        copies = list(db.session.scalars(select(Message).where(Message.subject == "daemon shared")))
        assert sorted(m.envelope_to for m in copies) == ["keeper@example.com", "second@example.com"]
        for msg in copies:
            assert not any(a.in_source for a in msg.attachments)
            assert {a.filename: storage.read_attachment(a) for a in msg.attachments} == decoded(shared)
