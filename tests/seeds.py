"""The JSON examples of the documentation seeds (copied into tests/data/seeds),
in the order they appear, so tests compare the server with the seeds themselves."""
from __future__ import annotations

import json
from pathlib import Path

SEEDS = Path(__file__).parent / "data" / "seeds"


def examples(prefix: str) -> list:
    """Every JSON object that starts a line of the seed file named ``prefix*``."""
    text = next(SEEDS.glob(prefix + "*.txt")).read_text(encoding="utf-8")
    decoder, found, pos = json.JSONDecoder(), [], 0
    while True:
        start = text.find("\n{", pos)
        if start < 0:
            return found
        obj, end = decoder.raw_decode(text, start + 1)
        found.append(obj)
        pos = end
