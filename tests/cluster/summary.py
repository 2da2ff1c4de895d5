"""The cluster test's end-of-run summary (the adversarial suite's ``record`` for this directory)."""
from __future__ import annotations

SUMMARY: list[str] = []


def record(line: str) -> None:
    """Add a line to the summary (and print it for ``-s`` runs)."""
    SUMMARY.append(line)
    print(f"[cluster] {line}")
