"""gunicorn's gevent worker, fair to every connection and to its siblings.

``make run`` serves the web app with one gevent worker per core
(deploy/gunicorn.conf.py). Against the threaded worker it replaced (two
workers per core, each with a pool of threads sharing one GIL), the same
two cores served 20-34 % more requests with a p99 latency a third as long
(bench/README.md, "Session 8: HTTP"): a gevent worker serves one request
after another in one thread, where threads passed the GIL back and forth
around every SQLite call and socket write, each hand-off a wait.

Stock gevent is not fair, in two ways this module mends:

* **Between connections of one worker.** A greenlet that answered a
  keep-alive request reads the next one at once; when it is already there
  (a busy client sends it the moment the answer arrives) the greenlet never
  waits, so never lets the others run: with wrk's 50 connections on two
  workers, stock gevent's p99 was 1-2 s. A ``sleep(0)`` after each request
  was not enough (p99 130-230 ms): it queues the greenlet as a callback,
  and gevent runs callbacks until none are left before it polls the
  sockets again, so the connections whose next request had not arrived yet
  waited for hundreds of ms behind those whose had. ``FairGeventWorker``
  yields with the shortest *timer* instead, which fires only after the
  loop's next poll of the sockets: every connection with a request waiting
  gets one turn per round (p99 23-38 ms).
* **Between workers.** Every worker waits on the same listening socket.
  When one sibling is off the CPU for a moment (a loaded machine), the
  other accepts a whole burst of new keep-alive connections (a client's
  pool, wrk's 50) and keeps them for their whole life. ``FairStreamServer``
  accepts at most ``BURST`` connections within ``WINDOW`` seconds, then
  stops accepting for ``PAUSE`` seconds, so a sibling gets the next ones
  (the kernel keeps them in the listen backlog meanwhile). With one worker,
  or connections arriving at an ordinary pace, it accepts as stock gevent.

``gunicorn --worker-class gevent`` applies gevent's ``monkey.patch_all()``
in the worker before it loads the app: threads (the new-mail listener, the
quota batcher) become greenlets, locks and sleeps cooperate, and psycopg 3
waits through gevent by itself (from 3.1.14). The price: a SQLite
statement holds the worker's other requests while it runs, where a thread
let the others run beside it; the web requests' statements are indexed
look-ups and one page of one mailbox.
"""
from __future__ import annotations

import time

import gevent
from gevent.server import StreamServer
from gunicorn.workers import ggevent

BURST = 4  # connections one worker takes in a row
WINDOW = 0.002  # seconds: accepts closer together than this are one burst
PAUSE = 0.002  # seconds without accepting after a burst
TURN = 0.000001  # seconds: the shortest timer, i.e. "after the next poll of the sockets"


class FairStreamServer(StreamServer):
    """gevent's server, pausing its accepts after a burst."""

    _burst_start = 0.0
    _burst_count = 0

    def do_handle(self, *args) -> None:
        super().do_handle(*args)
        now = time.monotonic()
        if now - self._burst_start > WINDOW:
            self._burst_start, self._burst_count = now, 0
        self._burst_count += 1
        if self._burst_count >= BURST:
            self._burst_count = 0
            self.stop_accepting()
            # gevent's own way back (it backs off the same way after accept errors)
            self._timer = self.loop.timer(PAUSE)
            self._timer.start(self._start_accepting_if_started)


class FairGeventWorker(ggevent.GeventWorker):
    """gunicorn's gevent worker, taking turns between connections and,
    when it has siblings, sharing bursts of new connections with them."""

    _quitting = False

    def run(self) -> None:
        if self.cfg.workers > 1:
            # GeventWorker.run builds its servers from this module-level
            # name; this runs in the worker process only, after the fork.
            ggevent.StreamServer = FairStreamServer
        super().run()

    def handle_quit(self, sig, frame) -> None:
        """Quit once. Ctrl-C in ``make run`` sends SIGINT to every process of
        the group, and the master then sends each worker SIGQUIT: gevent's
        worker spawned a second ``sys.exit`` for it, which raised in the
        middle of the interpreter's shutdown and printed a traceback."""
        if not self._quitting:
            self._quitting = True
            super().handle_quit(sig, frame)

    def handle_request(self, listener_name, req, sock, addr) -> bool:
        handled = super().handle_request(listener_name, req, sock, addr)
        try:
            gevent.sleep(TURN)  # the other connections' turn first (see the module's docstring)
        except gevent.GreenletExit:
            pass  # the worker is stopping: as GeventWorker.handle_request does
        return handled
