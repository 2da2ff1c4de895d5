"""Code and link extraction (``extract.py``, ``GET /api/messages/{id}/extract``).

The corpus under ``tests/data/extract/`` holds realistic messages written for
this test, each ``NN_lang_name.eml`` with its expected codes and links in
``NN_lang_name.json``. Every message goes through the project's own
``mailhandler.parse_message`` (the path a received message takes) and then
``extract``; precision and recall of the codes and of the link kinds are
printed and shown in the end-of-run summary (also under ``-q``), and must
both be at least 0.95. The route is then driven with the same messages sent
over real SMTP, on both databases.
"""
from __future__ import annotations

import json
import re
import smtplib
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import pytest

import extract
import mailhandler
from models import ApiKey, Message, User, db
from smtpserver import MailServer

CORPUS = Path(__file__).resolve().parent / "data" / "extract"
THRESHOLD = 0.95
KINDS = ("verify", "reset", "login", "unsubscribe", "other")


# --------------------------------------------------------------------------
# the end-of-run summary: a plugin registered by the first test that reports

class Figures:
    """Collects lines for pytest's terminal summary (printed under -q too)."""

    name = "tempmail-extract-figures"

    def __init__(self) -> None:
        self.lines: list[str] = []

    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.section("code and link extraction (tests/data/extract)")
        for line in self.lines:
            terminalreporter.write_line(line)


def report(config, lines: list[str]) -> None:
    plugin = config.pluginmanager.get_plugin(Figures.name)
    if plugin is None:
        plugin = Figures()
        config.pluginmanager.register(plugin, Figures.name)
    plugin.lines.extend(lines)
    print("\n".join(lines))


# --------------------------------------------------------------------------
# the corpus and its figures

@dataclass
class Sample:
    name: str
    raw: bytes
    expected: dict
    fields: dict

    @property
    def got(self) -> dict:
        return extract.extract(self.fields["subject"], self.fields["body_text"], self.fields["body_html"])


def load_corpus() -> list[Sample]:
    samples = []
    for path in sorted(CORPUS.glob("*.eml")):
        raw = path.read_bytes()
        expected = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        samples.append(Sample(path.stem, raw, expected, mailhandler.parse_message(raw)))
    return samples


@pytest.fixture(scope="module")
def corpus() -> list[Sample]:
    return load_corpus()


def ratio(hits: int, total: int) -> float:
    return hits / total if total else 1.0


def pr(expected: set, got: set) -> tuple[int, int, int]:
    """True positives, predictions, expectations."""
    return len(expected & got), len(got), len(expected)


def measure(results: list[tuple[str, dict, dict]]) -> dict:
    """Micro-averaged precision and recall over (message, code) and
    (message, url, kind) pairs, plus how often the first code is right."""
    sums = {key: [0, 0, 0] for key in ("codes", "links", "kinds")}
    first_right = with_codes = 0
    for name, expected, got in results:
        exp_links = {(name, link["url"], link["kind"]) for link in expected["links"]}
        got_links = {(name, link["url"], link["kind"]) for link in got["links"]}
        pairs = {
            "codes": ({(name, c) for c in expected["codes"]}, {(name, c) for c in got["codes"]}),
            "links": (exp_links, got_links),
            # the four kinds that matter to a test harness, "other" left out
            "kinds": ({x for x in exp_links if x[2] != "other"}, {x for x in got_links if x[2] != "other"}),
        }
        for key, (exp, hit) in pairs.items():
            for i, count in enumerate(pr(exp, hit)):
                sums[key][i] += count
        if expected["codes"]:
            with_codes += 1
            first_right += bool(got["codes"]) and got["codes"][0] == expected["codes"][0]
    figures = {}
    for key, (tp, predicted, wanted) in sums.items():
        figures[key] = {"precision": ratio(tp, predicted), "recall": ratio(tp, wanted),
                        "tp": tp, "predicted": predicted, "expected": wanted}
    figures["first_code"] = ratio(first_right, with_codes)
    return figures


def figure_lines(figures: dict, messages: int, where: str) -> list[str]:
    lines = [f"{where}: {messages} messages"]
    for key, label in (("codes", "codes"), ("kinds", "link kinds (verify/reset/login/unsubscribe)"),
                       ("links", "links (url + kind, all kinds)")):
        f = figures[key]
        lines.append(f"  {label}: precision {f['precision']:.3f} ({f['tp']}/{f['predicted']}), "
                     f"recall {f['recall']:.3f} ({f['tp']}/{f['expected']})")
    lines.append(f"  most likely code first: {figures['first_code']:.3f}")
    return lines


def mismatches(results) -> list[str]:
    out = []
    for name, expected, got in results:
        exp_links = [(x["url"], x["kind"]) for x in expected["links"]]
        got_links = [(x["url"], x["kind"]) for x in got["links"]]
        if expected["codes"] != got["codes"] or set(exp_links) != set(got_links):
            out.append(f"{name}: codes {got['codes']} (want {expected['codes']}), "
                       f"links missing {sorted(set(exp_links) - set(got_links))}, "
                       f"extra {sorted(set(got_links) - set(exp_links))}")
    return out


def test_corpus_is_what_the_figures_need(corpus):
    """At least 40 messages: several layouts, HTML only, quoted-printable,
    multipart, the four languages, and messages with decoys but no code."""
    assert len(corpus) >= 40
    langs = {lang: sum(f"_{lang}_" in s.name for s in corpus) for lang in ("en", "it", "vi", "tr")}
    assert all(count >= 6 for count in langs.values()), langs
    top = [mailhandler.headers_only(s.raw).get_content_type() for s in corpus]
    assert top.count("text/html") >= 8
    assert sum(t.startswith("multipart/") for t in top) >= 20
    assert sum(b"quoted-printable" in s.raw.lower() for s in corpus) >= 10
    assert sum(b"base64" in s.raw.lower() for s in corpus) >= 5
    assert sum(not s.expected["codes"] for s in corpus) >= 15
    assert sum(len(s.expected["codes"]) for s in corpus) >= 25
    for s in corpus:
        assert set(s.expected) == {"note", "codes", "links"}, s.name
        assert all(link["kind"] in KINDS for link in s.expected["links"]), s.name
    kinds = {link["kind"] for s in corpus for link in s.expected["links"]}
    assert kinds == set(KINDS)


def test_corpus_precision_and_recall(corpus, request):
    results = [(s.name, s.expected, s.got) for s in corpus]
    figures = measure(results)
    report(request.config, figure_lines(figures, len(corpus), "extract() over parse_message()"))
    wrong = "\n".join(mismatches(results))
    for key in ("codes", "kinds", "links"):
        assert figures[key]["precision"] >= THRESHOLD, wrong
        assert figures[key]["recall"] >= THRESHOLD, wrong
    assert figures["first_code"] >= THRESHOLD, wrong


def test_corpus_answers_are_well_formed(corpus):
    for sample in corpus:
        got = sample.got
        assert set(got) == {"codes", "links"}
        assert len(got["codes"]) == len(set(got["codes"]))
        urls = [link["url"] for link in got["links"]]
        assert len(urls) == len(set(urls)), sample.name
        for link in got["links"]:
            assert set(link) == {"url", "text", "kind"} and link["kind"] in KINDS
            assert re.match(r"https?://", link["url"]) and not any(ch.isspace() for ch in link["url"])


# --------------------------------------------------------------------------
# tricky cases, one at a time

def codes(subject="", text="", html="") -> list[str]:
    return extract.extract(subject, text, html)["codes"]


def links(subject="", text="", html="") -> list[tuple[str, str, str]]:
    return [(x["url"], x["text"], x["kind"]) for x in extract.extract(subject, text, html)["links"]]


@pytest.mark.parametrize("text", [
    "Your order #12345678 total is $1,249.00",
    "Order number: 12345678",
    "Total: 49,99 € — Totale: 1.249,00 €",
    "Amount: 250.000đ, tổng tiền 1.250.000 VND",
    "Toplam: 1.499,90 TL",
    "Call us on 1-800-555-0199 or +39 02 1234 5678",
    "Hotline: 1900 1234",
    "Müşteri Hizmetleri: 0850 222 0 333",
    "Date: 2026-05-03 14:32:10, or 03/05/2026 at 9:45",
    "© 2026 Acme Inc., 123 Main St, Springfield, IL 62701",
    "Tracking number: 9400 1118 9922 3344 5566 77",
    "Mã đơn hàng của bạn: 58213947",
    "Use promo code SAVE20 at checkout",
    "Codice sconto: ESTATE25",
    "İndirim kodu: YAZ2026",
    "We couldn't process your payment (error code 5003).",
    "Zip code on file: 94105",
    "Card ending 4821",
    "Transaction ID: 8F3K2L9Q",
    "Meeting ID: 845 2231 9087",
    "Enter the 6-digit code we sent to your phone ending in 0123",
    "Use code WELCOME10 for 10% off",
    "Nhập mã GIAM50K để được ưu đãi 50.000đ",
])
def test_decoys_are_no_codes(text):
    assert codes(text=text) == []


@pytest.mark.parametrize("text, expected", [
    ("Your verification code is 482913.", "482913"),
    ("482913 is your Acme code", "482913"),
    ("Verification code: 482 913", "482913"),
    ("Your code: K7QX-29PM", "K7QX-29PM"),
    ("Il tuo codice di verifica è 573920", "573920"),
    ("Mã xác minh của bạn là 648201", "648201"),
    ("Tek kullanımlık şifreniz: 482 615", "482615"),
    ("Doğrulama kodunuz: 905217", "905217"),
    ("DOĞRULAMA KODUNUZ: 905217", "905217"),
    ("Your temporary voicemail PIN is 0427.", "0427"),
    ("Mã OTP của Quý khách là 391 842, giao dịch 2.500.000 VND", "391842"),
    ("Your code for order 12345678 is 482913", "482913"),
    ("Please enter code 4821 to open locker 7 at 10 Main St, Cambridge 02139", "4821"),
    ("Temporary password: Xk7pQ2mZ", "Xk7pQ2mZ"),
    ("Your authentication code is ABCDEF", "ABCDEF"),
    ("Trendyol'a giriş için doğrulama kodunuz 638104'dür.", "638104"),
])
def test_codes_in_each_language(text, expected):
    assert codes(text=text) == [expected]


def test_code_below_the_line_that_announces_it():
    assert codes(text="Enter the code below to sign in:\n\n739 201\n") == ["739201"]
    assert codes(html="<p>Your security code</p><div style='font-size:32px'>602817</div>") == ["602817"]
    assert codes(html="<p>Enter the code:</p><table><tr>" + "".join(f"<td>{d}</td>" for d in "308514")
                 + "</tr></table>") == ["308514"]
    # a number below a line about something else is nothing
    assert codes(text="Order number:\n\n12345678\n") == []
    assert codes(text="Your code expires soon.\nAccount number:\n12345678\n") == []


def test_the_subject_code_comes_first_and_each_code_once():
    got = codes(subject="551902 is your Verifo code",
                text="Your code is 551902.\nBackup code: 73019284\n")
    assert got == ["551902", "73019284"]


def test_a_string_the_message_calls_a_promo_code_is_no_code_in_the_subject_either():
    assert codes(subject="Extra 20% off with code SAVE20", text="Use promo code SAVE20 at checkout.") == []


def test_vietnamese_decomposed_and_turkish_dotted_capitals():
    decomposed = unicodedata.normalize("NFD", "Mã xác minh của bạn là 648201")
    assert codes(text=decomposed) == ["648201"]
    assert links(html='<a href="https://x.example/r?t=1">ŞİFREMİ SIFIRLA</a>') == [
        ("https://x.example/r?t=1", "ŞİFREMİ SIFIRLA", "reset")]


def test_links_in_html_and_text():
    html = ('<p><a href="https://t.example/c?u=1&amp;v=2"><img alt="Verify email" src="x.png"></a>'
            '<a href="mailto:help@example.com">Mail us</a> <a href="javascript:alert(1)">x</a>'
            ' <a href=" https://ex.example/help ">Help</a> <a href="ftp://ex.example/f">FTP</a></p>'
            '<p>To stop these emails <a href="https://ex.example/l/9">click here</a>.</p>')
    text = ("Verify email: https://t.example/c?u=1&v=2\n"
            "Docs (https://ex.example/docs/start), and more.\n"
            "Sign in at https://ex.example/signin.\n")
    assert links(html=html, text=text) == [
        ("https://t.example/c?u=1&v=2", "Verify email", "verify"),
        ("https://ex.example/help", "Help", "other"),
        ("https://ex.example/l/9", "click here", "unsubscribe"),
        ("https://ex.example/docs/start", "Docs", "other"),
        ("https://ex.example/signin", "Sign in at", "login"),
    ]


@pytest.mark.parametrize("text, url, kind", [
    ("Annulla l'iscrizione", "https://n.example/a?id=1", "unsubscribe"),
    ("Hủy đăng ký", "https://n.example/a?id=1", "unsubscribe"),
    ("Abonelikten çık", "https://n.example/a?id=1", "unsubscribe"),
    ("Update your preferences", "https://n.example/profile?id=1", "unsubscribe"),
    ("Reimposta la password", "https://n.example/a?id=1", "reset"),
    ("Đặt lại mật khẩu", "https://n.example/a?id=1", "reset"),
    ("Conferma indirizzo email", "https://n.example/a?id=1", "verify"),
    ("Xác nhận email", "https://n.example/a?id=1", "verify"),
    ("E-posta adresimi doğrula", "https://n.example/a?id=1", "verify"),
    ("Accedi a Lavagna", "https://n.example/a?id=1", "login"),
    ("Đăng nhập", "https://n.example/a?id=1", "login"),
    ("Giriş yap", "https://n.example/a?id=1", "login"),
    ("Click here", "https://n.example/account/password/reset?t=1", "reset"),
    ("Open", "https://trk.example/c?u=https%3A%2F%2Fa.example%2Fverify%3Ft%3D1", "verify"),
    ("Get help", "https://n.example/help/verification?utm_campaign=verify", "other"),
    ("View your order", "https://n.example/orders/1?utm_campaign=password_reset", "other"),
])
def test_link_kinds(text, url, kind):
    assert links(html=f'<a href="{url}">{text}</a>') == [(url, text, kind)]


def test_a_shortened_display_url_is_not_a_second_link():
    url = "https://acme.example/verify?token=abcdef0123456789"
    html = f'<a href="{url}">https://acme.example/verify?token=abcdef...</a>'
    text = "https://acme.example/verify?token=abcdef..."  # what a text part derived from that HTML shows
    assert links(html=html, text=text) == [(url, "https://acme.example/verify?token=abcdef...", "verify")]


def test_broken_html_still_gives_text_and_links():
    html = ('<p>Your code: <b>482913</b> <a href="https://x.example/v">Verify</a> < not a tag '
            '<!-- <a href="https://hidden.example/">x</a> --><script>var c = "111111";</script>'
            '<style>.x{}</style><a href=https://x.example/u>Unsubscribe<a href="https://x.example/l">Sign in')
    got = extract.extract("", "", html)
    assert got["codes"] == ["482913"]
    assert [(x["url"], x["kind"]) for x in got["links"]] == [
        ("https://x.example/v", "verify"), ("https://x.example/u", "unsubscribe"), ("https://x.example/l", "login")]


@pytest.mark.parametrize("make", [
    lambda n: "<a" * (n // 2),                      # html.parser: quadratic
    lambda n: "</" * (n // 2),
    lambda n: "<div>" * (n // 5) + "code 482913",   # nh3: quadratic
    lambda n: "<" * n,
    lambda n: '<a href="' + "x" * n,
    lambda n: "<!--" + "-" * n,
    lambda n: "<p>" + "code 1234 " * (n // 10),
    lambda n: "&#" * (n // 2),
])
def test_hostile_html_is_read_in_one_pass(make):
    """Inputs that make html.parser or nh3 take tens of seconds at this size:
    the scanner reads them in one forward pass (a regression would show as a
    very slow test, not as a timing assertion)."""
    html = make(extract.MAX_HTML)
    got = extract.extract("", "", html)
    assert isinstance(got["codes"], list) and isinstance(got["links"], list)


def test_inputs_are_capped():
    padding = "x " * extract.MAX_HTML
    assert codes(html=padding + "<p>Your code is 482913</p>") == []
    assert codes(text="a\n" * extract.MAX_TEXT + "Your code is 482913") == []
    assert codes(subject="x" * extract.MAX_SUBJECT + " code 482913") == []
    many = "".join(f'<a href="https://x.example/{i}">l</a>' for i in range(extract.MAX_LINKS + 50))
    assert len(links(html=many)) == extract.MAX_LINKS


def test_many_codes_and_labels_on_one_line():
    line = " ".join(f"code {100000 + i} order {200000 + i}" for i in range(5000))
    got = codes(text=line)
    assert got == [str(100000 + i) for i in range(extract.MAX_CODES)]


# --------------------------------------------------------------------------
# the route, with the corpus sent over real SMTP (SQLite and PostgreSQL)

ROUTE_SAMPLES = ("02_en_otp_html_table", "03_en_verify_link_qp", "13_en_digit_cells_qp",
                 "24_it_bank_pin_latin1", "27_vi_bank_otp_qp", "35_tr_reset_tracking", "06_en_order_confirmation")


def new_key(app, email: str) -> dict:
    with app.app_context():
        _key, raw = ApiKey.issue(User.create(email))
        db.session.commit()
    return {"Authorization": f"Bearer {raw}", "Accept": "application/json"}


def send_over_smtp(app, address: str, samples: list[Sample]) -> None:
    server = MailServer(app, "127.0.0.1", 0, purge=False).start()
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
            for sample in samples:
                assert smtp.sendmail("sender@example.org", [address], sample.raw) == {}
    finally:
        server.stop()


def test_route_answers_the_extraction_of_each_message(app, client, corpus, request):
    samples = [s for s in corpus if s.name in ROUTE_SAMPLES]
    assert len(samples) == len(ROUTE_SAMPLES)
    auth = new_key(app, "extract@example.org")
    address = client.post("/api/emails", headers=auth).get_json()["data"]["email"]
    send_over_smtp(app, address, samples)
    listed = client.get(f"/api/messages?email={address}", headers=auth).get_json()["messages"]
    by_subject = {m["subject"]: m["id"] for m in listed}
    results = []
    for sample in samples:
        resp = client.get(f"/api/messages/{by_subject[sample.fields['subject']]}/extract", headers=auth)
        assert resp.status_code == 200 and resp.is_json
        body = resp.get_json()
        assert body["status"] is True and set(body["data"]) == {"codes", "links"}
        assert body["data"] == sample.got, sample.name  # the stored message extracts as the parsed one
        results.append((sample.name, sample.expected, body["data"]))
    figures = measure(results)
    backend = request.getfixturevalue("backend")
    report(request.config, figure_lines(figures, len(results), f"GET /api/messages/{{id}}/extract on {backend}"))
    assert figures["codes"]["precision"] == figures["codes"]["recall"] == 1.0, mismatches(results)
    assert figures["kinds"]["precision"] == figures["kinds"]["recall"] == 1.0, mismatches(results)


def test_route_is_owned_counted_and_leaves_the_message_unseen(app, client, corpus):
    sample = next(s for s in corpus if s.name == "02_en_otp_html_table")
    auth = new_key(app, "owner@example.org")
    other = new_key(app, "intruder@example.org")
    address = client.post("/api/emails", headers=auth).get_json()["data"]["email"]
    send_over_smtp(app, address, [sample])
    msg_id = client.get(f"/api/messages?email={address}", headers=auth).get_json()["messages"][0]["id"]
    url = f"/api/messages/{msg_id}/extract"

    first = client.get(url, headers=auth)
    second = client.get(url, headers=auth)
    assert first.status_code == second.status_code == 200
    assert second.get_json()["data"]["codes"] == ["739201"]
    assert int(second.headers["X-RateLimit-Used"]) == int(first.headers["X-RateLimit-Used"]) + 1
    with app.app_context():
        assert db.session.query(Message).filter_by(public_id=msg_id).one().is_read is False

    for headers, path, status in ((other, url, 404), (auth, "/api/messages/" + "x" * 46 + "/extract", 404),
                                  ({}, url, 401)):
        resp = client.get(path, headers=headers)
        assert resp.status_code == status and resp.get_json()["status"] is False
    before = int(client.get(url, headers=other).headers["X-RateLimit-Used"])
    assert int(client.get(url, headers=other).headers["X-RateLimit-Used"]) == before  # a 404 is not counted
    assert client.post(url, headers=auth).status_code == 405
