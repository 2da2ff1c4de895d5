"""The User API's message ids (``idgen.new_public_id``): 46 characters of
[A-Za-z0-9], each uniform, drawn by rejection sampling in ``bytes.translate``."""
from __future__ import annotations

import collections
import itertools

import idgen


def test_the_table_maps_kept_bytes_uniformly_and_drops_the_rest():
    # Uniform because every character is the image of exactly four kept byte values.
    kept = [b for b in range(256) if b not in idgen._ID_DROP]
    images = collections.Counter(idgen._ID_TABLE[b] for b in kept)
    assert len(kept) == 248 and set(idgen._ID_DROP) == set(range(248, 256))
    assert set(images) == set(idgen.PUBLIC_ID_ALPHABET.encode()) and set(images.values()) == {4}
    assert bytes(range(256)).translate(idgen._ID_TABLE, idgen._ID_DROP) == bytes(idgen._ID_TABLE[:248])


def test_ids_have_the_shape_and_spread_of_uniform_characters():
    ids = [idgen.new_public_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == idgen.PUBLIC_ID_LENGTH and i.isascii() and i.isalnum() for i in ids)
    counts = collections.Counter(itertools.chain.from_iterable(ids))
    expected = len(ids) * idgen.PUBLIC_ID_LENGTH / 62
    assert set(counts) == set(idgen.PUBLIC_ID_ALPHABET)
    # 3,710 expected per character; six standard deviations (~360) is a bound
    # a biased table (byte % 62 over all 256 values: +21 % for the first eight) breaks.
    assert all(abs(n - expected) < 6 * expected ** 0.5 for n in counts.values()), counts


def test_a_draw_with_too_few_kept_bytes_draws_again(monkeypatch):
    draws = iter([bytes([250] * 20 + list(range(36))), bytes(range(56))])
    monkeypatch.setattr(idgen.secrets, "token_bytes", lambda n: next(draws))
    alphabet = idgen.PUBLIC_ID_ALPHABET
    expected = "".join(alphabet[b % 62] for b in list(range(36)) + list(range(10)))
    assert idgen.new_public_id() == expected
