"""Prometheus counters shared by the web app and the mail daemon.

Deliberately imports nothing of the project: the receivers, the retention
pass and the HTTP layer all count here without pulling each other in.
With ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus-client writes the counts
to files there and ``/metrics`` (ops.py) adds up every process.
"""
from __future__ import annotations

from prometheus_client import Counter

MESSAGES = Counter("tempmail_messages", "Messages offered to the receivers, by outcome and reason.",
                   ["outcome", "reason"])
REQUESTS = Counter("tempmail_http_requests", "HTTP requests by URL rule, method and status.",
                   ["route", "method", "status"])
ANSWERS_FROM_MEMORY = Counter("tempmail_http_answers_from_memory",
                              "HTTP answers sent again from a worker's memory (hotpath.py), by hot route.",
                              ["route"])
PURGE_RUNS = Counter("tempmail_purge_runs", "Retention passes run (flask purge and the daemon timer).")
PURGE_ROWS = Counter("tempmail_purge_rows", "Rows and files removed by retention passes, by kind.",
                     ["kind"])
WEBHOOK_ATTEMPTS = Counter("tempmail_webhook_attempts", "Webhook delivery attempts, by outcome.", ["outcome"])


def count_message(outcome: str, reason: str = "") -> None:
    """Count one message offered to a receiver: ``outcome`` is ``accepted`` or
    ``rejected``; ``reason`` a short fixed word (``relay_denied``,
    ``user_unknown``, ``too_big``, ``error``...), never free text, so the
    number of label values stays small."""
    MESSAGES.labels(outcome=outcome, reason=reason or "").inc()


# HTTP methods counted under their own name; any other (a client may send
# any token as a method) is counted as "other", so clients cannot add series.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_request_counters: dict = {}


def count_request(rule: str, method: str, status: str) -> None:
    """Count one HTTP answer under its URL rule (``/api/messages/<id>``, not
    the path: one series per route, however many ids clients ask for).

    The labelled child is kept per (rule, method, status): ``labels()``
    validates and locks on every call (4.6 % of a busy web worker's GIL
    time, bench/README "Session 6: HTTP"). The keys are as few as the
    series: rules, the methods above and three-digit statuses."""
    key = (rule, method if method in KNOWN_METHODS else "other", status)
    counter = _request_counters.get(key)
    if counter is None:
        counter = _request_counters.setdefault(key, REQUESTS.labels(route=key[0], method=key[1], status=status))
    counter.inc()
