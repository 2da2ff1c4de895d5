"""``mimeheaders.canonical_date``: a Date header already in ``format_datetime``'s
form is taken as it is, and only where the stdlib's header object gives
exactly that string back (generated dates, valid and not)."""
from __future__ import annotations

from email import utils

from hypothesis import given, settings, strategies as st

import mailparse
import mimeheaders


def stdlib_value(value: str) -> str:
    return str(mailparse.PARSE_POLICY.header_fetch_parse("date", value))


def two(n: int) -> str:
    return f"{n:02d}"


# Every field over its valid range and past it (day 00 and 31 Feb, hour 24,
# second 60, zone minutes 60, zone 24 hours, years under 100), with the
# weekday right or wrong.
DATES = st.builds(
    lambda wd, d, m, y, hh, mm, ss, sign, zh, zm: f"{wd}, {two(d)} {m} {y:04d} {two(hh)}:{two(mm)}:{two(ss)} "
                                                  f"{sign}{two(zh)}{two(zm)}",
    st.sampled_from(mimeheaders._DAYS), st.integers(0, 32), st.sampled_from(mimeheaders._MONTHS),
    st.one_of(st.integers(1990, 2040), st.integers(0, 9999)), st.integers(0, 25), st.integers(0, 61),
    st.integers(0, 61), st.sampled_from("+-"), st.one_of(st.integers(0, 14), st.integers(0, 30)),
    st.sampled_from([0, 30, 45, 59, 60, 75]))


@settings(max_examples=1500, deadline=None)
@given(DATES)
def test_a_canonical_date_is_what_the_stdlib_writes_back(value):
    if mimeheaders.canonical_date(value):
        assert stdlib_value(value) == value
        assert mimeheaders.plain_value("date", value) == value
    plain = mimeheaders.plain_value("date", value)
    if plain is not None:
        assert plain == stdlib_value(value)


def test_canonical_dates_take_the_short_path_and_others_do_not():
    now = utils.format_datetime(utils.localtime())
    assert mimeheaders.canonical_date(now) and mimeheaders.canonical_date("Mon, 30 Nov 2026 10:00:00 -0000")
    for value in ["Tue, 30 Nov 2026 10:00:00 +0000",  # Monday named Tuesday: the stdlib writes "Mon"
                  "Mon, 30 Nov 2026 10:00:00 +0060", "Mon, 30 Nov 2026 10:00:00 +2400",
                  "Sat, 31 Feb 2026 10:00:00 +0000", "Mon, 30 Nov 0026 10:00:00 +0000",
                  "Mon, 30 Nov 2026 10:00:60 +0000", "Mon, 30 Nov 2026 10:00 +0000", "Mon, 3 Nov 2026 10:00:00 +0000",
                  "Mon, 30 Nov 2026 10:00:00 GMT", "Mon, 30 Nov 2026 10:00:00 +0000 (UTC)"]:
        assert not mimeheaders.canonical_date(value), value
        plain = mimeheaders.plain_value("date", value)
        assert plain is None or plain == stdlib_value(value)
