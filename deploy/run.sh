#!/usr/bin/env bash
# `make run`: the web app (gunicorn) and the mail daemon (flask smtpd) in the
# foreground, stopped together.
#
#   deploy/run.sh HOST PORT        (VENV and METRICS_DIR from the environment)
#
# - Ctrl-C (SIGINT to the whole process group) or SIGTERM (to this script
#   alone, e.g. from make, which forwards TERM to its recipe): both servers
#   get SIGTERM, this script waits for them, then ends by the same signal,
#   so make and the shell report an interrupt (130) or a termination (143).
#   The handlers reset themselves first: the old recipe's
#   `trap 'kill 0' INT TERM EXIT` signalled its own group, re-entered itself
#   and crashed (segfault of the recipe shell, RecursionError in Python).
# - One server ending by itself (a port in use, a bad config) stops the
#   other, and its exit status is ours.
# - Metrics: both servers share PROMETHEUS_MULTIPROC_DIR (METRICS_DIR, default
#   instance/metrics), emptied here at start as prometheus-client requires, so
#   /metrics adds up the gunicorn workers and the mail daemon.
set -u
cd "$(dirname "$0")/.."

host="${1:-127.0.0.1}"
port="${2:-8000}"
venv="${VENV:-.venv}"
metrics_dir="${METRICS_DIR:-instance/metrics}"

mkdir -p "$metrics_dir"
# Only prometheus-client's own files: METRICS_DIR may be any folder a user named.
find "$metrics_dir" -maxdepth 1 -type f -name '*.db' -delete
PROMETHEUS_MULTIPROC_DIR="$(cd "$metrics_dir" && pwd)"
export PROMETHEUS_MULTIPROC_DIR

web="" mail="" signal_name=""

stop_servers() {
    trap '' INT TERM  # reset first: a second Ctrl-C must not re-enter this
    kill -TERM $web $mail 2>/dev/null
    wait $web $mail 2>/dev/null
}

on_signal() {
    signal_name="$1"
    stop_servers
    trap - "$signal_name"
    kill -s "$signal_name" $$  # end by the signal itself: callers see an interrupt
    exit $((128 + $(kill -l "$signal_name")))  # not reached unless the signal is blocked
}
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

echo "Web app on http://$host:$port/ ; mail daemon as configured (flask smtpd)"
# --no-control-socket: gunicorn's default control socket is one path per user,
# which two `make run`s (or a test's) would fight over; nothing here uses it.
# Worker count: deploy/gunicorn.conf.py (two per core; TEMPMAIL_WORKERS overrides).
"$venv/bin/gunicorn" --config deploy/gunicorn.conf.py --bind "$host:$port" \
    --no-control-socket wsgi:application &
web=$!
"$venv/bin/flask" --app app smtpd &
mail=$!

# Until a signal (its trap runs) or the first server to end by itself.
wait -n $web $mail
status=$?
if [ "$status" -eq 0 ]; then
    # Both servers end with status 0 only when asked to stop. A Ctrl-C
    # reaches every process of the group at once, and bash may reap a server
    # that stopped on it before it runs its own trap (seen under load, even
    # 0.3 s later): so a clean end is a stop, not a failure.
    echo "run.sh: a server stopped on request (exit status 0); stopping the other" >&2
else
    echo "run.sh: a server stopped by itself (exit status $status); stopping the other" >&2
fi
stop_servers
exit "$status"
