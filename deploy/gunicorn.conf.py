"""gunicorn settings for deploy/systemd/tempmail-web.service and `make run`.

With PROMETHEUS_MULTIPROC_DIR set, every worker writes its metrics to that
folder and /metrics adds them up; a worker that exits must be marked dead so
its live gauges stop counting.

logger_class: the access and error logs write /m/<email_token> paths (request
line, Referer, the app's own error lines) as /m/~<fingerprint>, so the logs
open no mailbox (logmask.py).
"""
import gc
import os
import resource
import signal

bind = "127.0.0.1:8000"
# One gevent worker per core (fairaccept.py): each serves its connections
# one request after another in one thread, taking turns fairly. Measured
# with bench/http_api.py on 2 cores (bench/README, "Session 8: HTTP"),
# against the threaded workers it replaced (two per core, 1,100 threads
# each, whose GIL hand-offs around every SQLite call and socket write were
# waits): 20-34 % more requests per second, p99 a third as long.
workers = int(os.environ.get("TEMPMAIL_WORKERS") or os.cpu_count() or 1)
worker_class = "fairaccept.FairGeventWorker"
# Held requests (?wait= long polls, Server-Sent Events streams) each keep a
# greenlet asleep, without a database connection, until mail or their time
# comes. live.max_held_per_process (1000 by default) stays below this, so at
# least TEMPMAIL_CONNECTIONS - 1000 connections of each worker are always
# left for ordinary requests (bench/capacity.py measures it).
worker_connections = int(os.environ.get("TEMPMAIL_CONNECTIONS", "1300"))


def raise_open_files(wanted: int = 8192) -> None:
    """Every held request is an open socket: a worker holding a thousand
    needs more than the soft limit of 1,024 open files many systems start
    with. Raise the soft limit toward the hard one (workers inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


raise_open_files()
accesslog = "-"
logger_class = "logmask.MaskingLogger"
forwarded_allow_ips = "127.0.0.1"


def child_exit(_server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(worker.pid)


def post_worker_init(worker):
    """Freeze the startup heap, then take over SIGTERM (below).

    gc.freeze(): the ~118,000 objects the app built while loading (modules,
    Flask, SQLAlchemy's mappers, Babel's catalogues) live as long as the
    worker, yet every full collection walked them all, with the GIL held:
    29-35 ms of CPU on an idle machine, 170-260 ms of wall time under wrk at
    load ~10, stalling every request of that worker (bench/README "Session
    5: HTTP"). Frozen, they are never walked again: a full collection then
    took under 0.1 ms idle, 2-10 ms under wrk.

    On SIGTERM (a stop, or the old workers of a reload), end the held
    requests at once, long polls answering with what there is and streams
    closing so their clients resume elsewhere, instead of holding the
    shutdown for up to graceful_timeout."""
    stop = worker.handle_exit

    def handle_exit(sig, frame):
        import mailevents
        mailevents.shutdown()
        stop(sig, frame)
    signal.signal(signal.SIGTERM, handle_exit)
    gc.freeze()
