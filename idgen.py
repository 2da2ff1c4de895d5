"""Names and identifiers: the username rules every front and catch-all
share, and the ids that strangers must not be able to guess.

* Random usernames: an adjective, a noun and seven digits (``calmotter4821907``):
  128 × 128 × 10^7 ≈ 2^37 names, still readable and at most 19 characters.
* User API message ids: 46 random characters of [A-Za-z0-9] (the seed's shape).
* api.php ids: the seed shows integers (``"id": 1``), so rows keep their
  sequential primary keys inside the database, and api.php shows a keyed
  permutation of them instead: a Feistel network over 52 bits. Distinct
  keys give distinct ids, the ids stay below 2^53 (exact in every JSON
  parser), one id says nothing about any other, and because the primary keys
  are never reused (AUTOINCREMENT / sequences) neither are the ids shown.
"""
from __future__ import annotations

import hashlib
import re
import secrets
import string

from flask import current_app

USERNAME_RE = re.compile(r"^[a-z0-9]{3,20}$")
PUBLIC_ID_ALPHABET = string.ascii_letters + string.digits
PUBLIC_ID_LENGTH = 46  # the User API seed's message ids are 46 [A-Za-z0-9]
ID_BITS = 52
# Row ids are INTEGER columns: 32-bit on PostgreSQL. A shown id whose key
# would be larger names no row, and must not reach the database at all.
MAX_ROW_ID = 2 ** 31 - 1
_HALF = ID_BITS // 2
_MASK = (1 << _HALF) - 1
_ROUNDS = 6

ADJECTIVES = (
    "amber", "azure", "bold", "brave", "brisk", "calm", "clear", "clever", "cool", "cosy",
    "crisp", "curly", "dandy", "daring", "deep", "dizzy", "eager", "early", "easy", "fair",
    "fancy", "fast", "fine", "fluffy", "fresh", "frosty", "funny", "gentle", "giant", "glad",
    "golden", "good", "grand", "green", "happy", "hardy", "hazy", "honest", "humble", "icy",
    "jolly", "juicy", "keen", "kind", "large", "lazy", "light", "lively", "lucky", "lunar",
    "magic", "mellow", "merry", "mighty", "mild", "misty", "modern", "noble", "nimble", "odd",
    "olive", "orange", "plain", "plucky", "polite", "proud", "quick", "quiet", "rapid", "rare",
    "ready", "red", "regal", "rosy", "royal", "rustic", "safe", "sandy", "shiny", "silent",
    "silky", "silver", "simple", "sleek", "slow", "smart", "smooth", "snowy", "soft", "solar",
    "spicy", "steady", "stormy", "sturdy", "sunny", "super", "sweet", "swift", "tall", "tame",
    "tender", "tidy", "tiny", "true", "urban", "vast", "velvet", "vivid", "warm", "wavy",
    "wild", "windy", "wise", "witty", "young", "zany", "zesty", "agile", "alpine", "arctic",
    "breezy", "bright", "cheery", "cosmic", "dusty", "jade", "lemon", "minty")
NOUNS = (
    "acorn", "anchor", "apple", "arrow", "badger", "bamboo", "beacon", "bear", "birch", "bison",
    "breeze", "brook", "cactus", "canyon", "cedar", "cherry", "cloud", "clover", "comet", "coral",
    "cotton", "crane", "daisy", "delta", "dingo", "donkey", "dove", "dragon", "dune", "eagle",
    "ember", "falcon", "fern", "finch", "fjord", "flame", "forest", "fox", "galaxy", "garden",
    "gecko", "glade", "goose", "grape", "harbor", "hazel", "heron", "hill", "island", "ivy",
    "jaguar", "jasper", "kayak", "kiwi", "koala", "lagoon", "lake", "lark", "lemur", "lily",
    "lotus", "lynx", "mango", "maple", "marble", "meadow", "meteor", "moose", "moss", "nectar",
    "newt", "nova", "oak", "ocean", "orbit", "orchid", "otter", "owl", "panda", "parrot",
    "peach", "pebble", "pepper", "pine", "pixel", "planet", "plum", "pond", "poppy", "quartz",
    "rabbit", "raven", "reef", "river", "robin", "rocket", "saddle", "sage", "salmon", "shell",
    "spruce", "squid", "star", "stone", "storm", "swan", "thorn", "tiger", "timber", "toucan",
    "tulip", "turtle", "valley", "violet", "walrus", "willow", "wolf", "wren", "yak", "zebra",
    "acacia", "bonsai", "cobalt", "canary", "harp", "igloo", "koi", "lamb")
assert len(ADJECTIVES) == 128 and len(NOUNS) == 128
assert all(len(w) <= 6 and w.isascii() and w.isalpha() for w in ADJECTIVES + NOUNS)


class MailboxError(Exception):
    """A mailbox could not be opened; ``code`` names why and ``message`` says
    it in the words every front shows (the first three are the PHP
    original's). ``retry_after`` is set for the temporary refusals."""

    MESSAGES = {
        "invalid": "Invalid username. Use 3-20 alphanumeric characters only.",
        "reserved": "This username is reserved and cannot be used.",
        "taken": "Username already taken. Please choose another one.",
        "domain": "Invalid domain. Use one of the domains listed by /domains.",
        "rate_limited": "Too many addresses were created from your network. Try again later.",
        "full": "No new addresses can be created right now. Try again later.",
    }

    def __init__(self, code: str, retry_after: int = 0):
        super().__init__(code)
        self.code, self.retry_after = code, retry_after

    @property
    def message(self) -> str:
        return self.MESSAGES.get(self.code, self.MESSAGES["invalid"])


def check_username(username: str) -> str:
    """Lower-case ``username`` and check it: 3-20 ASCII letters/digits, not reserved."""
    name = (username or "").strip().lower()
    # str.isalnum() would let unicode digits and letters through; the PHP
    # original used ctype_alnum on bytes, i.e. ASCII only.
    if not USERNAME_RE.match(name) or not name.isascii():
        raise MailboxError("invalid")
    if name in {r.lower() for r in current_app.config["TEMPMAIL"]["reserved_usernames"]}:
        raise MailboxError("reserved")
    return name


def random_username() -> str:
    """A readable random username with about 37 bits of entropy."""
    digits = str(secrets.randbelow(10 ** 7)).zfill(7)
    return secrets.choice(ADJECTIVES) + secrets.choice(NOUNS) + digits


# Random bytes below 248 (4 x 62) map onto the alphabet uniformly (byte % 62);
# the 8 above are dropped: rejection sampling, done in C by bytes.translate.
_ID_TABLE = bytes(PUBLIC_ID_ALPHABET.encode("ascii")[b % 62] for b in range(248)) + bytes(8)
_ID_DROP = bytes(range(248, 256))
_ID_DRAW = 56  # bytes per draw: 46 or more survive with probability 1 - 3e-6


def new_public_id() -> str:
    """An opaque, unguessable message id: 46 random characters of [A-Za-z0-9],
    each uniform and independent (5.9 bits of entropy each, 273 in all)."""
    # One urandom call and two C passes per id, ~0.6 us: the base-62 digits of
    # a 320-bit number took 46 Python divmods (~5 us, once per stored message).
    kept = b""
    while len(kept) < PUBLIC_ID_LENGTH:
        kept += secrets.token_bytes(_ID_DRAW).translate(_ID_TABLE, _ID_DROP)
    return kept[:PUBLIC_ID_LENGTH].decode("ascii")


def _round_keys(purpose: str) -> list[bytes]:
    cache = current_app.extensions.setdefault("tempmail_idkeys", {})
    if purpose not in cache:
        secret = str(current_app.config["SECRET_KEY"]).encode()
        cache[purpose] = [hashlib.blake2b(f"{purpose}:{n}".encode(), key=secret[:64], digest_size=16).digest()
                          for n in range(_ROUNDS)]
    return cache[purpose]


def _f(key: bytes, half: int) -> int:
    digest = hashlib.blake2b(half.to_bytes(4, "big"), key=key, digest_size=4).digest()
    return int.from_bytes(digest, "big") & _MASK


_EXPOSED_MAX = 100_000  # remembered ids per app (a few MiB at most)


def expose(row_id: int, purpose: str) -> int:
    """The id api.php shows for primary key ``row_id`` of table ``purpose``."""
    # Six keyed BLAKE2b rounds per id were a third of an inbox listing's CPU;
    # an id's permutation never changes, and pollers ask for the same ids
    # again and again, so each app remembers the ones it computed.
    cache = current_app.extensions.setdefault("tempmail_exposed", {})
    shown = cache.get((purpose, row_id))
    if shown is None:
        left, right = row_id >> _HALF, row_id & _MASK
        for key in _round_keys(purpose):
            left, right = right, left ^ _f(key, right)
        shown = (left << _HALF) | right
        if len(cache) >= _EXPOSED_MAX:
            cache.clear()
        cache[(purpose, row_id)] = shown
    return shown


def expose_many(row_ids: list[int], purpose: str) -> list[int]:
    """``expose`` of each id of a listing, with one look-up of the app's cache."""
    cache = current_app.extensions.setdefault("tempmail_exposed", {})
    return [cache.get((purpose, row_id)) or expose(row_id, purpose) for row_id in row_ids]


def unexpose(shown: int, purpose: str) -> int:
    """The primary key behind an id that ``expose`` produced (any number below
    2^52 maps to some key; callers look it up and answer 404 when missing)."""
    left, right = shown >> _HALF, shown & _MASK
    for key in reversed(_round_keys(purpose)):
        left, right = right ^ _f(key, left), left
    return (left << _HALF) | right


def row_id_of(raw: str, purpose: str) -> int | None:
    """The primary key behind the shown id ``raw``, or None when no row can have it."""
    shown = parse_shown_id(raw)
    row_id = unexpose(shown, purpose) if shown is not None else None
    return row_id if row_id is not None and 0 < row_id <= MAX_ROW_ID else None


def parse_shown_id(raw: str) -> int | None:
    """A path segment as an api.php id, or None when it cannot be one: not
    ASCII digits, or not below 2^52 (so no huge number reaches the database)."""
    if not raw or not (raw.isascii() and raw.isdigit()) or len(raw) > 16:
        return None
    value = int(raw)
    return value if value < (1 << ID_BITS) else None
