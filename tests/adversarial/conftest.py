"""Plumbing of the adversarial suite: SQLite unless a test asks for more, and
the summary of what was tried and what held, printed at the end of the run
(also under ``-q``, through the terminal reporter)."""
from __future__ import annotations

import pytest

from .helpers import SUMMARY


@pytest.fixture(params=["sqlite"])
def backend(request):
    """The heavy parts run once, on SQLite; tests that must also hold on
    PostgreSQL parametrize ``backend`` themselves (indirectly)."""
    return request.param


def pytest_terminal_summary(terminalreporter):
    if not SUMMARY:
        return
    terminalreporter.section("adversarial suite: what was tried and what held")
    for section in sorted(SUMMARY):
        terminalreporter.write_line(f"[{section}]")
        for line in SUMMARY[section]:
            terminalreporter.write_line(f"  {line}")
