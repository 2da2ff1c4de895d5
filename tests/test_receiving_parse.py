"""parse_message and deliver() without a network: MIME shapes, charsets,
hostile names, storage failures, and generated malformed input."""
from __future__ import annotations

import base64
from email.message import EmailMessage
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from sqlalchemy import func, select

import bodycuts
import htmltext
import mailhandler
import mailparse
import mimeheaders
import models
from models import Attachment, Domain, Mailbox, Message, db
import storage  # noqa: E402
import mailpolicy  # noqa: E402

DATA = Path(__file__).parent / "data"
CHARSET_SAMPLES = {
    "iso-8859-1": "Grüße aus Köln, ça va? ñ",
    "windows-1252": "Smart “quotes” – and € sign",
    "koi8-r": "Привет, мир! Съешь ещё этих булок",
    "shift_jis": "こんにちは世界、テスト",
    "gb2312": "你好，世界。测试邮件",
}


def add_box(name: str, domain: str = "example.com") -> Mailbox:
    return Mailbox.create(name, Domain.by_name(domain), 3600)


def test_alternative_with_attachment_and_inline_image():
    msg = EmailMessage()
    msg["From"] = '"Ann Example" <ann@example.org>'
    msg["To"] = "bob@example.com"
    msg["Cc"] = "carl@example.com"
    msg["Subject"] = "Report"
    msg["Message-ID"] = "<abc@example.org>"
    msg.set_content("plain body\r\n")
    msg.add_alternative('<p>html <img src="cid:logo1"></p>', subtype="html")
    msg.get_payload()[1].add_related(b"\x89PNG\r\n\x1a\nxx", "image", "png", cid="<logo1>")
    msg.add_attachment(bytes(range(256)), maintype="application", subtype="octet-stream",
                       filename="data.bin")
    fields = mailhandler.parse_message(msg.as_bytes())
    assert (fields["from_name"], fields["from_email"]) == ("Ann Example", "ann@example.org")
    assert fields["to"] == "bob@example.com" and fields["cc"] == "carl@example.com"
    assert fields["message_id"] == "<abc@example.org>"
    assert fields["body_text"] == "plain body\n"
    assert 'src="cid:logo1"' in fields["body_html"]
    image, data = fields["attachments"]
    assert (image["content_id"], image["inline"], image["content_type"]) == ("logo1", True, "image/png")
    assert image["filename"] == "image.png"
    assert (data["filename"], data["data"], data["inline"]) == ("data.bin", bytes(range(256)), False)


def test_html_only_gets_text_from_html():
    raw = (b"From: a@b.c\r\nSubject: h\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           b"<html><head><style>p{}</style></head><body><p>Hello</p><p>World &amp; co</p></body></html>")
    fields = mailhandler.parse_message(raw)
    assert fields["body_text"] == "Hello\n\nWorld & co" or fields["body_text"].split() == ["Hello", "World", "&", "co"]
    assert "<p>Hello</p>" in fields["body_html"]


def test_html_only_inline_elements_flow_and_blocks_break_lines():
    raw = (b"From: a@b.c\r\nSubject: h\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
           b"<html><head><title>T</title><style>p{color:red}</style></head><body>"
           b"<p>Hello <b>John</b>, <a href=x>click here</a></p>"
           b"<div>Line one</div><div>Line <span>two</span></div>"
           b"<ul><li>first</li><li>second</li></ul>a<br>b<table><tr><td>Code</td><td>123456</td></tr></table>"
           b"<pre>keep\n    this</pre><script>alert(1)</script><!-- hidden -->&lt;end&gt; &amp; &eacute;</body></html>")
    fields = mailhandler.parse_message(raw)
    assert fields["body_text"] == ("Hello John, click here\n\nLine one\nLine two\n\nfirst\nsecond\n\na\nb\n\n"
                                   "Code 123456\n\nkeep\n    this\n\n<end> & \u00e9")


def test_html_to_text_on_hostile_markup():
    """Shapes that are quadratic for html.parser / BeautifulSoup (tags that
    never close) and for html5ever (deep nesting); over the bound only the
    first MAX_HTML_TEXT_CHARS characters are converted."""
    assert htmltext.html_to_text("<a " * 200_000 + "<p>end") == "end"
    assert htmltext.html_to_text("<div>" * 80_000 + "deep" + "</div>" * 80_000) == "deep"
    assert htmltext.html_to_text("<!--" + "x" * 1000) == ""
    assert htmltext.html_to_text("a <b c") == "a"
    big = htmltext.html_to_text("<p>word</p>" * 1_000_000)
    assert big.startswith("word\n\nword") and big.endswith("[\u2026]")
    assert big.count("word") == htmltext.MAX_HTML_TEXT_CHARS // len("<p>word</p>")


def huge_header_message() -> bytes:
    """A 1 MB message: an attachment named by 60,000 RFC 2047 words, a text
    part whose Content-Type has 60,000 parameters before its charset, and a
    Content-Type of 5,000 nested comments."""
    words = b"\r\n ".join([b"=?utf-8?b?w6k=?="] * 60_000)
    params = b";\r\n ".join(b"p%d=v" % i for i in range(60_000))
    return (b"From: a@b.c\r\nSubject: huge headers\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
            b"--B\r\nContent-Type: text/plain; " + params + b"; charset=koi8-r\r\n\r\nplain body\r\n"
            b"--B\r\nContent-Type: text/plain; " + b"(" * 5000 + b"\r\n\r\nsecond body\r\n"
            b"--B\r\nContent-Type: application/octet-stream\r\n"
            b'Content-Disposition: attachment; filename="' + words + b'"\r\n\r\nfile\r\n--B--\r\n')


def test_every_header_goes_through_one_bounded_reading():
    fields = mailhandler.parse_message(huge_header_message())
    assert fields["body_text"] == "plain body\nsecond body"  # the charset beyond the bound is not read
    (att,) = fields["attachments"]
    assert att["filename"] == "\u00e9" * mailhandler.MAX_NAME and att["data"] == b"file"
    msg = mailparse.parse_bytes(huge_header_message())
    text, second, attachment = msg.get_payload()
    assert text.get_params()[0] == ("text/plain", "") and text.get_content_charset() is None
    assert mimeheaders.MAX_HEADER_CHARS * 3 // 4 < len(text.raw_value("content-type")) <= mimeheaders.MAX_HEADER_CHARS
    assert second.get_content_type() == "text/plain"
    # Read once: the same parsed objects on every call.
    assert attachment.mime("content-disposition") is attachment.mime("content-disposition")
    assert msg.get("subject") is msg["subject"] and str(msg["subject"]) == "huge headers"


def test_mime_parameters_rfc2045_and_rfc2231():
    raw = (b"From: a@b.c\r\nContent-Type: Multipart/Mixed (comment); BOUNDARY=\"=_b; c\"\r\n\r\n"
           b"--=_b; c\r\nContent-Type: Text/HTML; Charset=\"ISO-8859-1\" (Latin)\r\n\r\n<p>caf\xe9</p>\r\n"
           b"--=_b; c\r\nContent-Type: application/pdf; name=report(1).pdf\r\n"
           b"Content-Disposition: attachment; filename=\"fallback.pdf\";\r\n"
           b" filename*0*=utf-8''%E6%97%A5; filename*1*=%E6%9C%AC; filename*2=\".pdf\"\r\n\r\nPDF\r\n"
           b"--=_b; c\r\nContent-Type: text/plain; name=\"say \\\"hi\\\";.txt\"\r\n"
           b"Content-Transfer-Encoding: BASE64 (junk) " + b"x" * 100_000 + b"\r\n\r\naGk=\r\n--=_b; c--\r\n")
    fields = mailhandler.parse_message(raw)
    assert fields["body_html"].strip() == "<p>caf\u00e9</p>" and fields["body_text"] == "caf\u00e9"
    pdf, quoted = fields["attachments"]
    assert (pdf["filename"], pdf["content_type"], pdf["data"]) == ("\u65e5\u672c.pdf", "application/pdf", b"PDF")
    assert (quoted["filename"], quoted["data"]) == ('say "hi";.txt', b"hi")
    msg = mailparse.parse_bytes(raw)
    assert msg.get_boundary() == "=_b; c" and msg.get_payload(1).get_param("name") == "report(1).pdf"
    msg.replace_header("Content-Type", "text/plain; charset=utf-8")  # a change drops what was read
    assert msg.get_content_type() == "text/plain" and msg.get_param("charset") == "utf-8"


def test_parse_stops_at_its_part_and_line_bounds(monkeypatch):
    parts = b"".join(b"--p\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i for i in range(10))
    raw = b"Subject: many\r\nContent-Type: multipart/mixed; boundary=p\r\n\r\n" + parts + b"--p--\r\n"
    monkeypatch.setattr(mailparse, "MAX_PARSE_PARTS", 5)
    monkeypatch.setattr(bodycuts, "MAX_PARSE_PARTS", 5)  # where the walk stops too
    fields = mailhandler.parse_message(raw)
    assert fields["subject"] == "many"
    assert fields["body_text"].split("\n") == [f"part {i}" for i in range(5)]
    monkeypatch.setattr(mailparse, "MAX_PARSE_PARTS", 2000)
    monkeypatch.setattr(bodycuts, "MAX_PARSE_PARTS", 2000)
    monkeypatch.setattr(mailparse, "MAX_PARSE_LINES", 12)
    text = mailhandler.parse_message(b"Subject: lines\r\n\r\n" + b"".join(b"line %d\r\n" % i for i in range(100)))
    # 12 lines: the Subject, the blank line, then the first ten of the body.
    assert text["subject"] == "lines" and text["body_text"] == "".join(f"line {i}\n" for i in range(10))


def test_text_and_html_bodies_are_kept_up_to_their_cap():
    """Each of the text and the HTML body keeps MAX_BODY_BYTES (the raw .eml
    keeps all): a str costs up to 4 bytes a character."""
    cap = mailhandler.MAX_BODY_BYTES
    text = "\u00e9".encode() + b"t" * 74 + b"\r\n" + (b"t" * 76 + b"\r\n") * (cap // 78 - 1)
    raw = (b"Subject: big\r\nContent-Type: multipart/alternative; boundary=Z\r\n\r\n--Z\r\n"
           b"Content-Type: text/plain; charset=utf-8\r\n\r\n" + text + b"m" * 76 + b"\r\nlast\r\n--Z\r\n"
           b"Content-Type: text/html\r\n\r\n<p>" + b"h" * 100 + b"</p>\r\n--Z--\r\n")
    fields = mailhandler.parse_message(raw)
    assert len(text) < cap < len(text) + 78
    assert fields["body_text"] == (text + b"m" * 76)[:cap].decode().replace("\r\n", "\n") + "\n[\u2026]"
    assert fields["body_html"] == "<p>" + "h" * 100 + "</p>"


def test_long_lines_are_folded_for_the_parser_and_base64_is_unchanged():
    data = bytes(range(256)) * 600
    raw = (b"Subject: long\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n--B\r\n"
           b"Content-Type: text/plain\r\n\r\n" + b"w" * 70_000 + b"\r\n--B\r\n"
           b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
           + base64.b64encode(data) + b"\r\n--B--\r\n")
    fields = mailhandler.parse_message(raw)
    assert fields["attachments"][0]["data"] == data  # one 204,800-character line
    assert fields["body_text"] == "w" * mimeheaders.MAX_LINE + "\n " + "w" * (70_000 - mimeheaders.MAX_LINE)


def test_slow_codecs_are_not_body_charsets():
    """punycode takes quadratic time (40 KB: 1.6 s) and is no mail charset."""
    body = b"-" + b"9" * 60_000
    raw = b"Subject: p\r\nContent-Type: text/plain; charset=punycode\r\n\r\n" + body
    assert mailhandler.parse_message(raw)["body_text"] == body.decode()
    assert mimeheaders.safe_codec("punycode") is None and mimeheaders.safe_codec("IDNA") is None
    assert mimeheaders.safe_codec("latin1") == "iso8859-1" and mimeheaders.safe_codec("base64") is None


def test_pipe_headers_are_bounded_too():
    raw = b"".join(b"Delivered-To: u%d@example.com\r\n" % i for i in range(1000)) + b"Subject: x\r\n\r\nx"
    values = mailhandler.headers_only(raw).get_all("delivered-to")
    assert len(values) == mimeheaders.MAX_SAME_HEADERS and str(values[0]) == "u0@example.com"


@pytest.mark.parametrize("charset", list(CHARSET_SAMPLES))
def test_legacy_charsets_in_8bit_body_and_encoded_subject(charset):
    text = CHARSET_SAMPLES[charset]
    msg = EmailMessage()
    msg["Subject"] = text  # RFC 2047 encoded-words (utf-8) in the header
    msg["From"] = "x@y.z"
    body = text.encode(charset)
    raw = (msg.as_bytes().split(b"\n\n")[0].replace(b"\n", b"\r\n")
           + f"\r\nContent-Type: text/plain; charset={charset}\r\n"
             "Content-Transfer-Encoding: 8bit\r\n\r\n".encode() + body + b"\r\n")
    fields = mailhandler.parse_message(raw)
    assert fields["subject"] == text
    assert fields["body_text"].strip() == text


def test_rfc2047_subject_in_legacy_charset_and_rfc2231_filename():
    raw = (b"From: =?koi8-r?b?8NLJ18XU?= <p@example.org>\r\n"
           b"Subject: =?iso-8859-1?q?Gr=FC=DFe?= =?windows-1252?q?_=80?=\r\n"
           b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n"
           b"Content-Type: text/plain\r\n\r\nhi\r\n--XX\r\n"
           b"Content-Type: application/pdf\r\n"
           b"Content-Disposition: attachment; filename*=utf-8''r%C3%A9sum%C3%A9%20%E2%82%AC.pdf\r\n"
           b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0=\r\n--XX--\r\n")
    fields = mailhandler.parse_message(raw)
    assert fields["from_name"] == "Привет"
    assert fields["subject"] == "Grüße €"
    (att,) = fields["attachments"]
    assert (att["filename"], att["data"]) == ("résumé €.pdf", b"%PDF-")


def test_broken_charsets_and_raw_8bit_headers_never_raise():
    raw = ("Subject: Grüße\r\nFrom: Jürgen <j@example.org>\r\n"
           "Content-Type: text/plain; charset=x-no-such-charset\r\n\r\nkörper, grüße, schön\r\n").encode("utf-8")
    raw += b"\xff\xfe\x00 tail"
    fields = mailhandler.parse_message(raw)
    assert fields["subject"] == "Grüße" and fields["from_name"] == "Jürgen"
    assert "körper" in fields["body_text"] and "\x00" not in fields["body_text"]


def test_nested_message_is_an_eml_attachment():
    inner = b"From: i@example.org\r\nSubject: Inner one\r\n\r\ninner body\r\n"
    raw = (b"From: o@example.org\r\nSubject: outer\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
           b"--B\r\nContent-Type: text/plain\r\n\r\nouter body\r\n--B\r\n"
           b"Content-Type: message/rfc822\r\n\r\n" + inner + b"--B--\r\n")
    fields = mailhandler.parse_message(raw)
    assert fields["body_text"].strip() == "outer body"
    (att,) = fields["attachments"]
    assert att["filename"] == "Inner one.eml" and att["content_type"] == "message/rfc822"
    assert b"inner body" in att["data"]


@pytest.mark.parametrize("path", sorted((DATA / "cpython").glob("msg_*.txt")), ids=lambda p: p.name)
def test_cpython_samples_parse(path):
    fields = mailhandler.parse_message(path.read_bytes())
    assert fields["subject"] or fields["body_text"] or fields["attachments"]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_parse_never_raises_on_random_bytes(raw):
    fields = mailhandler.parse_message(raw)
    assert set(fields) >= {"from_email", "subject", "body_text", "body_html", "attachments"}
    assert all("\x00" not in str(v) for k, v in fields.items() if k != "attachments")


HEADER_NAMES = st.sampled_from(["Subject", "From", "To", "Cc", "Content-Type", "Content-Disposition",
                                "Content-Transfer-Encoding", "Content-ID", "Message-ID", "Date"])
HEADER_VALUES = st.one_of(
    st.text(max_size=60),
    st.sampled_from(['multipart/mixed; boundary="b"', "multipart/alternative", "text/html; charset=klingon",
                     "base64", "quoted-printable", "x-uuencode", "=?utf-8?b?!!!?=", "=?x?q?a?=", "<>",
                     'attachment; filename*=utf-8\'\'%FF%FE', '"\\" <@>', "<../../app.py>",
                     'inline; filename="../../../etc/passwd"', "message/rfc822"]))
BODIES = st.one_of(st.binary(max_size=500), st.sampled_from([
    b"--b\r\nContent-Type: text/plain\r\n\r\nx\r\n--b--", b"--b\r\n--b\r\n\r\n", b"=ZZ=\r\n", b"@@@@",
    b"--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: in\r\n\r\nbody\r\n--b--\r\n"]))


@st.composite
def malformed_messages(draw) -> bytes:
    headers = draw(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=8))
    head = b"".join(f"{k}: {v}".encode("utf-8", "surrogateescape") + b"\r\n" for k, v in headers)
    return head + draw(st.sampled_from([b"\r\n", b"", b"\n"])) + draw(BODIES)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=malformed_messages())
def test_malformed_messages_are_stored_never_crash(app, raw):
    with app.app_context():
        if Mailbox.find_live("fuzz@example.com") is None:
            add_box("fuzz")
        msgs = mailhandler.deliver(raw, ["fuzz@example.com"])
        stored = db.session.get(Message, msgs[0].id)
        assert storage.blob_path(stored.raw_sha256).read_bytes() == raw
        for att in stored.attachments:
            path = storage.blob_path(att.sha256)
            assert Path(app.config["UPLOADS_DIR"]).resolve() in path.parents and path.is_file()


def test_hostile_names_stay_inside_uploads(app):
    raw = (b"From: e@evil.example\r\nSubject: x\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
           b"--B\r\nContent-Type: image/png\r\nContent-ID: <../../app.py>\r\n\r\nPNG\r\n"
           b"--B\r\nContent-Type: text/plain\r\n"
           b'Content-Disposition: attachment; filename="../../../etc/passwd"\r\n\r\nroot:x\r\n--B--\r\n')
    with app.app_context():
        add_box("victim")
        (msg,) = mailhandler.deliver(raw, ["victim@example.com"])
        uploads = Path(app.config["UPLOADS_DIR"]).resolve()
        names = {a.filename: a for a in msg.attachments}
        assert set(names) == {"image.png", "passwd"}
        assert names["image.png"].content_id == "../../app.py"
        for att in msg.attachments:
            assert ".." not in att.sha256 and uploads in storage.blob_path(att.sha256).parents
        assert storage.blob_path(names["passwd"].sha256).read_bytes() == b"root:x"


def test_store_failure_rolls_back_rows_and_files(app, monkeypatch):
    with app.app_context():
        add_box("solid")
        raw = b"Subject: s\r\nContent-Type: application/zip\r\n\r\nPK"

        def broken_commit(pending):
            raise OSError("disk full")
        monkeypatch.setattr(storage, "commit_durably", broken_commit)
        with pytest.raises(mailhandler.StoreFailed):
            mailhandler.deliver(raw, ["solid@example.com"])
        assert db.session.scalar(select(func.count()).select_from(Message)) == 0
        assert db.session.scalar(select(func.count()).select_from(Attachment)) == 0
        assert [p for p in Path(app.config["UPLOADS_DIR"]).rglob("*") if p.is_file()] == []


def test_refusals_and_catch_all(app_factory):
    app = app_factory({"catch_all": True})
    with app.app_context():
        with pytest.raises(mailhandler.RelayDenied):
            mailhandler.deliver(b"Subject: x\r\n\r\nx", ["who@elsewhere.org"])
        with pytest.raises(mailhandler.TooLarge):
            mailhandler.deliver(b"x" * (mailhandler.max_message_bytes() + 1), ["a@example.com"])
        # Catch-all follows /generate's username rules: no dots, no reserved names.
        with pytest.raises(mailhandler.UnknownRecipient):
            mailhandler.deliver(b"Subject: x\r\n\r\nx", ["New.Person@Example.com"], "s@o.org")
        (msg,) = mailhandler.deliver(b"Subject: x\r\n\r\nx", ["NewPerson@Example.com"], "s@o.org")
        assert Mailbox.find_live("newperson@example.com").id == msg.mailbox_id
        assert msg.envelope_from == "s@o.org"
        assert models.Stat.snapshot()["total_addresses"] == 1


def test_unknown_user_without_catch_all(app):
    with app.app_context():
        add_box("known")
        with pytest.raises(mailhandler.UnknownRecipient):
            mailhandler.deliver(b"Subject: x\r\n\r\nx", ["nobody@example.com"])
        with pytest.raises(mailhandler.UnknownRecipient):
            mailpolicy.check_recipient("nobody@example.com")
        with pytest.raises(mailhandler.RelayDenied):
            mailpolicy.check_recipient("known@example.net")
        mailpolicy.check_recipient("KNOWN@example.com")


# --------------------------------------------------------------------------
# plain header values: the same answer as the stdlib's header objects

def stdlib_value(name: str, value: str) -> str:
    return str(mailparse.PARSE_POLICY.header_fetch_parse(name, value))


# Pieces of header values, plain and not: the generated values mix them, so
# both the plain path and its refusals are exercised.
WORDS = ["John", "Doe", "O'Brien", "a-b_c", "x", "Ünï", '"Q"', "(c)", "=?utf-8?q?J=C3=B6?=", "a.b", "", " "]
LOCALS = ["john", "a.b+c", "x_y-z", "a..b", ".a", "ü", "a b", "q\"q"]
DOMAINS = ["example.com", "x-y.z", "localhost", "[1.2.3.4]", "a.b.c.d", "-x.com", "ex ample.com"]
DATES = ["Mon, 30 Nov 2026 10:00:00 +0000", "30 Nov 2026 10:00 -0500", "Mon, 30 Nov 2026 10:00:00",
         "Mon, 30 Nov 2026 10:00:00 GMT", "Tue, 1 Dec 2026 25:00:00 +0000", "garbage", "31 Feb 2026 1:2:3 +0100"]
SEPARATORS = [" ", "  ", "", "\t", ", ", ","]


def addresses():
    addr = st.builds(lambda l, d: f"{l}@{d}", st.sampled_from(LOCALS), st.sampled_from(DOMAINS))
    name = st.lists(st.sampled_from(WORDS), max_size=3).map(" ".join)
    one = st.one_of(addr, addr.map(lambda a: f"<{a}>"),
                    st.builds(lambda n, s, a: f"{n}{s}<{a}>", name, st.sampled_from(SEPARATORS), addr))
    return st.lists(one, min_size=1, max_size=3).flatmap(
        lambda items: st.sampled_from(SEPARATORS).map(lambda sep: (sep if "," in sep else ", ").join(items)))


@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.tuples(st.sampled_from(["from", "to", "cc", "reply-to"]), addresses()),
    st.tuples(st.just("date"), st.sampled_from(DATES)),
    st.tuples(st.just("message-id"), st.builds(lambda l, d: f"<{l}@{d}>", st.sampled_from(LOCALS + ["a@b"]),
                                                st.sampled_from(DOMAINS))),
    st.tuples(st.just("subject"), st.lists(st.sampled_from(WORDS + ["Re:", "[x]", "\u00e9t\u00e9"]), max_size=5)
              .flatmap(lambda ws: st.sampled_from(SEPARATORS).map(lambda sep: sep.join(ws)))),
))
def test_plain_header_values_are_what_the_stdlib_says(item):
    """``mimeheaders.plain_value`` answers only where it gives exactly the
    stdlib's string; everything else it leaves to the stdlib (None)."""
    name, value = item
    plain = mimeheaders.plain_value(name, value)
    if plain is not None:
        assert plain == stdlib_value(name, value)
    if name in ("from", "to") and (found := mimeheaders.plain_addresses(value)):
        parsed = mailparse.PARSE_POLICY.header_fetch_parse(name, value).addresses
        assert found == [(a.display_name, a.addr_spec) for a in parsed]


def test_plain_header_values_cover_the_usual_forms():
    """The forms most mail uses do take the plain path."""
    assert mimeheaders.plain_value("from", "John Doe <john@example.com>") == "John Doe <john@example.com>"
    assert mimeheaders.plain_value("to", "<a@b.example>, c@d.example") == "a@b.example, c@d.example"
    assert mimeheaders.plain_value("date", "Mon, 30 Nov 2026 10:00:00 +0000") == "Mon, 30 Nov 2026 10:00:00 +0000"
    assert mimeheaders.plain_value("message-id", "<1.2@host.example>") == "<1.2@host.example>"
    assert mimeheaders.plain_value("subject", "Your code: 123456") == "Your code: 123456"
    assert mimeheaders.plain_value("subject", "=?utf-8?q?caf=C3=A9?=") is None
    assert mimeheaders.plain_value("from", '"Doe, John" <j@example.com>') is None
