"""gunicorn settings for deploy/systemd/tempmail-web.service and `make run`.

With PROMETHEUS_MULTIPROC_DIR set, every worker writes its metrics to that
folder and /metrics adds them up; a worker that exits must be marked dead so
its live gauges stop counting.

logger_class: the access and error logs write /m/<email_token> paths (request
line, Referer, the app's own error lines) as /m/~<fingerprint>, so the logs
open no mailbox (logmask.py).
"""
import os

bind = "127.0.0.1:8000"
workers = int(os.environ.get("TEMPMAIL_WORKERS", "3"))
threads = 4
# gthread that leaves part of a burst of new connections to its sibling
# workers (fairaccept.py): with stock gthread one worker often took all of a
# client's 50 keep-alive connections and served them on one core.
worker_class = "fairaccept.FairThreadWorker"
accesslog = "-"
logger_class = "logmask.MaskingLogger"
forwarded_allow_ips = "127.0.0.1"


def child_exit(_server, worker):
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess
        multiprocess.mark_process_dead(worker.pid)
