"""Unit tests of the HTML-mail sanitiser and the plain-text linkifier (no app needed)."""
from __future__ import annotations

import pytest

import mailview
from mailview import clean_style, linkify_text, sanitize_html

CIDS = {"logo@mail": "/m/tok/messages/1/attachments/7"}


def clean(html: str, remote: bool = False):
    return sanitize_html(html, CIDS.get, remote)


@pytest.mark.parametrize("hostile, forbidden", [
    ("<script>alert(1)</script><p>ok</p>", ["<script", "alert"]),
    ('<img src="x" onerror="alert(1)">', ["onerror", "alert"]),
    ('<a href="javascript:alert(1)">x</a>', ["javascript", "alert"]),
    ('<a href="JaVaScRiPt&#58;alert(1)">x</a>', ["alert"]),
    ('<form action="https://evil.example/"><input name="pw"><button>Go</button></form>',
     ["<form", "<input", "<button", "evil.example"]),
    ('<p style="background:url(https://evil.example/t.gif)">x</p>', ["url(", "evil.example"]),
    ('<p style="color:red;background-image:url(//evil.example/t.gif)">x</p>', ["url(", "evil.example"]),
    ('<p style="color: \\75 rl(https://evil.example)">x</p>', ["evil.example", "\\75"]),
    ("<style>body{background:url(https://evil.example/x)}</style><p>x</p>", ["<style", "evil.example"]),
    ('<iframe src="https://evil.example"></iframe>', ["<iframe", "evil.example"]),
    ('<object data="https://evil.example/x.swf"></object>', ["<object", "evil.example"]),
    ('<svg><script>alert(1)</script></svg>', ["<svg", "alert"]),
    ('<meta http-equiv="refresh" content="0;url=https://evil.example">', ["<meta", "evil.example"]),
    ('<link rel="stylesheet" href="https://evil.example/x.css">', ["<link", "evil.example"]),
    ('<base href="https://evil.example/">', ["<base", "evil.example"]),
    ('<table background="https://evil.example/bg.gif"><tr><td>x</td></tr></table>', ["evil.example"]),
    ('<img srcset="https://evil.example/a.png 1x">', ["evil.example"]),
    ('<div onmouseover="alert(1)">x</div>', ["onmouseover", "alert"]),
])
def test_hostile_markup_is_removed(hostile, forbidden):
    out = clean(hostile).html
    for needle in forbidden:
        assert needle.lower() not in out.lower(), (hostile, out)


def test_remote_images_are_blocked_and_counted():
    result = clean('<img src="https://t.example/a.png" alt="A"><img src="http://t.example/b.png">'
                   '<img src="//t.example/c.png">')
    assert "t.example" not in result.html and result.blocked_images == 3
    assert 'alt="A"' in result.html


def test_remote_images_are_kept_when_the_reader_asks():
    result = clean('<img src="https://t.example/a.png">', remote=True)
    assert 'src="https://t.example/a.png"' in result.html and result.blocked_images == 0


def test_cid_images_point_at_the_attachment():
    result = clean('<img src="cid:logo@mail"><img src="cid:unknown@mail">')
    assert result.html == '<img src="/m/tok/messages/1/attachments/7"><img>'
    assert result.blocked_images == 0


def test_inline_data_images_stay_and_other_data_urls_go():
    png = "data:image/png;base64,iVBORw0KGgo="
    assert f'src="{png}"' in clean(f'<img src="{png}">').html
    assert "data:" not in clean('<img src="data:text/html;base64,PHNjcmlwdD4=">').html
    assert "data:" not in clean('<a href="data:text/html,<script>alert(1)</script>">x</a>').html


def test_links_open_in_a_new_tab_without_referrer():
    out = clean('<a href="https://example.org/confirm?t=1">Confirm</a>').html
    assert out == ('<a href="https://example.org/confirm?t=1" target="_blank" '
                   'rel="noopener noreferrer">Confirm</a>')


def test_relative_links_into_this_site_are_dropped():
    out = clean('<a href="/web/address/delete">x</a><a href="mailto:a@b.c">m</a>').html
    assert "/web/address" not in out and 'href="mailto:a@b.c"' in out


def test_formatting_and_tables_survive():
    out = clean('<table width="100%" cellpadding="4"><tr><td align="center" bgcolor="#eeeeee">'
                '<b>Bold</b> <em>em</em></td></tr></table><h1>T</h1><ul><li>i</li></ul>').html
    for kept in ('<table width="100%" cellpadding="4">', '<td align="center" bgcolor="#eeeeee">',
                 "<b>Bold</b>", "<em>em</em>", "<h1>T</h1>", "<li>i</li>"):
        assert kept in out


def test_head_and_title_text_do_not_leak_into_the_body():
    out = clean("<html><head><title>Secret title</title></head><body><p>Body</p></body></html>").html
    assert out == "<p>Body</p>"


@pytest.mark.parametrize("style, expected", [
    ("color: red; font-weight: bold", "color: red; font-weight: bold"),
    ("COLOR:#123;position:fixed;top:0", "color: #123"),
    ("background:url(x)", None),
    ("background-color: expression(alert(1))", None),
    ("width: 100px; behavior: url(x.htc)", "width: 100px"),
    ("", None),
])
def test_style_filter(style, expected):
    assert clean_style(style) == expected


def test_linkify_escapes_text_and_links_urls():
    out = str(linkify_text('<script>x</script> Visit https://example.org/a?b=1&c=2. Or "http://x.test"'))
    assert "<script>" not in out and "&lt;script&gt;" in out
    assert ('<a href="https://example.org/a?b=1&amp;c=2" target="_blank" rel="noopener noreferrer">'
            "https://example.org/a?b=1&amp;c=2</a>.") in out
    assert 'href="http://x.test"' in out


def test_linkify_leaves_javascript_alone():
    assert "<a" not in str(linkify_text("javascript:alert(1)"))


# --------------------------------------------------------------------------
# colours stay readable: a background that cannot be kept takes its text colour along

@pytest.mark.parametrize("style, expected", [
    # the shorthand's colour survives as background-color, its image does not
    ("background:#1a73e8 url(https://x.example/b.png) no-repeat;color:#fff",
     "background-color: #1a73e8; color: #fff"),
    ("background: rgb(26, 115, 232); color: white", "background-color: rgb(26, 115, 232); color: white"),
    ("BACKGROUND: Navy; COLOR: #FFF", "background-color: Navy; color: #FFF"),
    # a gradient keeps its first colour as a plain background
    ("background: linear-gradient(#0b5, #063); color: #fff", "background-color: #0b5; color: #fff"),
    # nothing of the background can stay: the white text goes with it
    ("background: url(https://x.example/b.png); color: #fff; padding: 8px", "padding: 8px"),
    ("background-image: url(//x.example/b.png); color: #ffffff", None),
    ("background-color: expression(alert(1)); color: #fff", None),
    ("background: none; color: #fff; font-weight: bold", "font-weight: bold"),
    # a background image next to a plain background colour: the colour carries the text
    ("background-color: #222; background-image: url(x.png); color: #eee", "background-color: #222; color: #eee"),
    # no background at all: the text colour is the mail's own choice
    ("color: #fff; font-size: 14px", "color: #fff; font-size: 14px"),
])
def test_colours_stay_consistent(style, expected):
    assert clean_style(style) == expected


def test_a_colour_taken_from_a_shorthand_is_only_a_colour():
    for hostile in ("background: url(javascript:alert(1)) red", "background: red\\75 rl(x)",
                    "background: expression(alert(1))", "background: url(http://e.example/" + "a" * 80 + "/red)"):
        kept = clean_style(hostile) or ""
        assert "url" not in kept and "expression" not in kept and "\\" not in kept, hostile
        assert kept in ("", "background-color: red"), (hostile, kept)


def test_button_keeps_its_background_in_the_cleaned_mail():
    out = clean('<a href="https://x.example" style="background:#1a73e8 url(https://x.example/b.png);'
                'color:#fff;padding:10px">Confirm</a>').html
    assert 'style="background-color: #1a73e8; color: #fff; padding: 10px"' in out
    out = clean('<td style="background-image:url(https://x.example/b.png);color:#fff">Go</td>').html
    assert "color" not in out and "x.example" not in out


def test_deep_nesting_is_flattened_in_linear_time():
    """html5ever is quadratic in nesting depth: tags deeper than MAX_NESTING
    are dropped before nh3 sees them, their text kept."""
    deep = "<div>" * 300_000 + "inner text" + "</div>" * 300_000 + "<p>after</p>"
    flat = mailview.bound_nesting(deep)
    assert flat.count("<div>") == mailview.MAX_NESTING == flat.count("</div>")
    assert "inner text" in flat and flat.endswith("<p>after</p>")
    safe = mailview.sanitize_html(deep, lambda cid: None, False).html
    assert "inner text" in safe and "<p>after</p>" in safe
    shallow = "<table><tr><td><b>x</b><br><img src='data:image/png;base64,AA=='></td></tr></table>"
    assert mailview.bound_nesting(shallow) == shallow
