"""gunicorn's gthread worker, sharing bursts of new connections with its siblings.

Every worker waits on the same listening socket. When a client opens many
keep-alive connections at once (wrk's 50, a browser's 6, a proxy's pool),
the first worker to wake accepts one after the other in a tight loop and
has taken them all before its siblings are even scheduled; the connections
stay with it for their whole life. Measured with ``bench/http_api.py``
(2 workers, 50 connections): one worker did 100 % of the work in about
half of the runs, and those runs served half as many requests.
``reuse_port`` does not help: gunicorn's workers share the master's one
socket, so the kernel has nothing to spread connections over.

``FairThreadWorker`` accepts at most ``BURST`` connections within ``WINDOW``
seconds, then stops accepting for ``PAUSE`` seconds, so a sibling gets the
next ones (the kernel keeps them in the listen backlog meanwhile). With one
worker, or connections arriving at an ordinary pace, it behaves exactly
like gthread.
"""
from __future__ import annotations

import time

from gunicorn.workers.gthread import ThreadWorker

BURST = 4  # connections one worker takes in a row
WINDOW = 0.002  # seconds: accepts closer together than this are one burst
PAUSE = 0.002  # seconds without accepting after a burst


class FairThreadWorker(ThreadWorker):
    """gthread, pausing its accepts after a burst when it has siblings."""

    _burst_start = 0.0
    _burst_count = 0
    _paused_until = 0.0

    def accept(self, listener) -> None:
        super().accept(listener)
        if self.cfg.workers < 2:
            return
        now = time.monotonic()
        if now - self._burst_start > WINDOW:
            self._burst_start, self._burst_count = now, 0
        self._burst_count += 1
        if self._burst_count >= BURST:
            self._paused_until, self._burst_count = now + PAUSE, 0

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        wait = self._paused_until - time.monotonic()
        if wait > 0:
            self.set_accept_enabled(False)  # run() enables it again once the pause is over
            timeout = min(timeout, wait)
        super().wait_for_and_dispatch_events(timeout)
