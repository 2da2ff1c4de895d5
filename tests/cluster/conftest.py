"""Plumbing of the cluster test: collected only when the suite runs on
PostgreSQL (the cluster has no SQLite form; ``TEMPMAIL_TEST_DBS=sqlite``
leaves it out, as it leaves out every PostgreSQL case), and its summary of
what was done and what held, printed at the end of the run."""
from __future__ import annotations

from conftest import BACKENDS  # tests/conftest.py

from .summary import SUMMARY

collect_ignore = [] if "postgresql" in BACKENDS else ["test_cluster.py"]


def pytest_terminal_summary(terminalreporter):
    if not SUMMARY:
        return
    terminalreporter.section("cluster: five hosts in network namespaces, what was done and what held")
    for line in SUMMARY:
        terminalreporter.write_line(f"  {line}")
