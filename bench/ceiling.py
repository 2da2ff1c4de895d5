"""How fast the reused-connection row could be: the daemon with parts of its writer taken out.

Issue 13 asks the 2 KB reused-connection row (``smtp-source -s 8 -d``) for
at least MailDev's warm rate, with a 250 that still means the message
survives a power loss. This runs, in one run and round after round beside
MailDev 2.2.1 (warmed up first) and smtp-sink, ``flask smtpd`` as ``make
run`` starts it (same configuration, same processes), once per *trial*,
each a daemon whose writer process does less than the real one:

* ``full``: as shipped (stores every message, fsyncs the WAL per batch);
* ``nosync``: stores every message but skips the WAL's fsync, as if
  durability cost nothing (``walsync.sync`` does nothing);
* ``syncfile``: stores nothing; per batch it writes 12 KiB a message into
  a preallocated file and fsyncs it, then answers 250: a writer whose only
  work is the durable write;
* ``none``: stores nothing and answers 250 at once: the receivers, the link
  to the writer and the load client alone.

Each trial is the shipped code, patched in the daemon's own process by this
script (``--daemon TRIAL``) before Flask's CLI starts it: nothing in the
product reads a trial. The rate is the messages stored (rows for ``full``
and ``nosync``, ``.eml`` files for MailDev) or answered (the trials that
store nothing, smtp-sink) over smtp-source's wall time; the daemon's CPU
per message comes from ``/proc``. A trial's rate bounds what any change to the parts it takes
out can give: if ``nosync`` is under MailDev, no way of making the fsync
cheaper reaches 1x; what ``syncfile`` leaves above MailDev is the whole
budget for storing a message.

``--sql-floor`` then gives the floor of SQLite's own share: the writer's
statements for batches of ``--batch`` 2 KB messages, recorded in-process
as SQLite got them (statements and parameters, from the writer's cursor),
are replayed on a bare ``sqlite3`` connection to a copy of the database
they started from, with the daemon's pragmas: the thread CPU a message of
SQLite running and committing them (no fsync), with no Python of ours
around them.

Run: ``.venv/bin/python bench/ceiling.py [--rounds 3] [--messages 12000] [--sql-floor]``
"""
from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import smtp_cpu  # noqa: E402
import smtp_ingest  # noqa: E402
import smtpload  # noqa: E402

TRIALS = {
    "full": "as shipped: stores, fsyncs the WAL per batch",
    "nosync": "stores, no WAL fsync (durability for free)",
    "syncfile": "stores nothing; 12 KiB a message + fsync per batch",
    "none": "stores nothing, answers 250 at once",
}
SYNC_BYTES_PER_MESSAGE = 12 * 1024  # about what a 2 KB message adds to the WAL (3 pages)
SYNC_FILE_BYTES = 64 << 20
RCPT = "ingest"


# --------------------------------------------------------------------------
# in the daemon's process: the trial's patch, then Flask's CLI

def durable_writer(path: str) -> Callable[[int], None]:
    """For ``syncfile``: a function that writes 12 KiB for each of ``n``
    messages into a preallocated file and fsyncs it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.pwrite(fd, b"\0" * SYNC_FILE_BYTES, 0)
    os.fsync(fd)

    def write(n: int) -> None:
        os.pwrite(fd, b"x" * min(SYNC_BYTES_PER_MESSAGE * n, SYNC_FILE_BYTES), 0)
        os.fsync(fd)
    return write


def settle_without_storing(reply: Callable, durable_write: Optional[Callable[[int], None]]) -> Callable:
    """A ``settle`` that stores nothing: per batch the durable write, if
    any, then 250 (``reply``) for every job."""
    def settle(jobs: list) -> None:
        if durable_write is not None:
            durable_write(len(jobs))
        for job in jobs:
            job.reply = reply(job)
    return settle


def patch(trial: str, sync_file: str) -> None:
    """Apply ``trial`` to the daemon's modules (before any process forks)."""
    import smtpserver  # noqa: PLC0415 - the daemon's own modules, patched in its process
    import walsync  # noqa: PLC0415
    if trial == "nosync":
        walsync.sync = lambda: None
    elif trial in ("syncfile", "none"):
        write = durable_writer(sync_file) if trial == "syncfile" else None
        smtpserver.settle = settle_without_storing(smtpserver.accepted_reply, write)


def daemon_main(trial: str, flask_args: list[str]) -> None:
    """``ceiling.py --daemon TRIAL -- --app app smtpd ...``: run in the sandbox's code directory."""
    sys.path.insert(0, os.getcwd())
    patch(trial, os.path.join(os.environ["TEMPMAIL_BENCH_DIR"], "trial-sync"))
    from flask.cli import main as flask_main  # noqa: PLC0415
    sys.argv = ["flask", *flask_args]
    flask_main()


# --------------------------------------------------------------------------
# the bench

@dataclass
class Target:
    """One server under the reused-connection load."""
    name: str
    port: int
    pids: list = field(default_factory=list)
    stored: Optional[Callable[[], int]] = None
    rates: list = field(default_factory=list)
    cpu: list = field(default_factory=list)


def start_trial(trial: str, stack: contextlib.ExitStack) -> Target:
    """A sandbox whose daemon runs ``trial``; its mailbox made, its port open."""
    box = stack.enter_context(common.Sandbox(f"ceiling-{trial}"))
    box.init_db()
    box.mailboxes([RCPT])
    env = dict(box.env(), TEMPMAIL_BENCH_DIR=str(box.dir))
    cmd = [str(common.PYTHON), str(Path(__file__).resolve()), "--daemon", trial, "--",
           "--app", "app", "smtpd", "--host", "127.0.0.1", "--port", str(box.smtp_port)]
    server = box.start("smtpd", cmd, box.smtp_port, env=env)
    time.sleep(1.0)
    counted = trial in ("full", "nosync")
    return Target(trial, box.smtp_port, box.pids(server, "smtpd"),
                  (lambda: box.count()) if counted else None)


def start_peers(stack: contextlib.ExitStack, messages: int) -> list[Target]:
    """MailDev (warmed up) and smtp-sink."""
    box = stack.enter_context(common.Sandbox("ceiling-peers"))
    maildev, _web = common.start_maildev(box)
    counter = smtp_ingest.maildev_counter(box.dir / "maildev")
    peers = [Target("MailDev 2.2.1", maildev.port, stored=lambda: counter(RCPT)),
             Target("smtp-sink", common.start_smtp_sink(box).port)]
    common.log("  warming up MailDev")
    run_load(peers[0], max(messages // 2, 2000), rcpt="warmup")
    return peers


def run_load(target: Target, messages: int, rcpt: str = RCPT) -> tuple[float, float]:
    """One ``smtp-source -s 8 -d`` run: (messages/s, daemon CPU ms a message or nan)."""
    cmd, env = smtpload.source_cmd("reuse", target.port, f"{rcpt}@{common.DOMAIN}", messages)
    before = target.stored() if target.stored else 0
    cpu0 = sum(smtp_cpu.cpu_seconds(target.pids)) if target.pids else 0.0
    start = time.monotonic()
    res = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    elapsed = time.monotonic() - start
    if res.returncode != 0 or res.stderr.strip():
        common.log(f"  {target.name}: smtp-source said: {res.stderr.decode(errors='replace')[:300]}")
    done = messages
    if target.stored and rcpt == RCPT:
        time.sleep(0.2 if target.pids else 1.0)  # MailDev writes its .eml after the 250
        done = target.stored() - before
    cpu = (sum(smtp_cpu.cpu_seconds(target.pids)) - cpu0) * 1000 / messages if target.pids else float("nan")
    return done / elapsed, cpu


# --------------------------------------------------------------------------
# the SQL floor

def plain(params):
    """Parameters as picklable values (the driver takes bytes for a view)."""
    def value(v):
        return bytes(v) if isinstance(v, (memoryview, bytearray)) else v
    if isinstance(params, dict):
        return {k: value(v) for k, v in params.items()}
    return tuple(value(v) for v in params)


def record_main(batch: int, messages: int, out: str) -> None:
    """``ceiling.py --record B N FILE`` (in the sandbox's environment): store
    N 2 KB messages with ``smtpserver.store_batch`` in batches of B and pickle
    what the writer's cursor gave SQLite, per batch: (sql, parameters, many),
    and (None, None, False) for a commit."""
    sys.path.insert(0, os.getcwd())
    import smtpserver  # noqa: PLC0415 - the code under measurement, from its own directory
    import writelock  # noqa: PLC0415
    import writer  # noqa: PLC0415
    from app import create_app  # noqa: PLC0415
    recorded: list[list[tuple]] = [[]]  # the set-up's own statements, then one list a batch
    cursor, connection = writelock.QueuedCursor, writelock.QueuedWriterConnection
    execute, executemany, commit = cursor.execute, cursor.executemany, connection.commit

    def traced_execute(self, sql, parameters=()):
        recorded[-1].append((sql, plain(parameters), False))
        return execute(self, sql, parameters)

    def traced_executemany(self, sql, seq):
        seq = list(seq)
        recorded[-1].append((sql, [plain(p) for p in seq], True))
        return executemany(self, sql, seq)

    def traced_commit(self):
        recorded[-1].append((None, None, False))
        return commit(self)
    cursor.execute, cursor.executemany, connection.commit = traced_execute, traced_executemany, traced_commit
    with create_app().app_context():
        rcpt = f"writer@{common.DOMAIN}"
        for start in range(0, messages, batch):
            recorded.append([])
            smtpserver.store_batch([smtpserver.Job(bytearray(writer.two_kb_message(rcpt, n)), [rcpt],
                                                   "sender@source.test", "bench", None)
                                    for n in range(start, start + batch)])
    with open(out, "wb") as fh:
        pickle.dump(recorded[1:], fh)


def record_batches(box: common.Sandbox, batch: int, messages: int) -> list[list[tuple]]:
    """``record_main`` in a child process of the sandbox; its batches."""
    out = box.dir / "statements.pickle"
    res = subprocess.run([str(common.PYTHON), str(Path(__file__).resolve()), "--record", str(batch),
                          str(messages), str(out)], env=box.env(), cwd=common.ROOT,
                         capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"recording the writer's statements failed:\n{res.stderr[-2000:]}")
    with open(out, "rb") as fh:
        return pickle.load(fh)  # written just now by our own child


def replay(path: Path, batches: list[list[tuple]], batch: int) -> float:
    """Thread CPU ms a message of running ``batches`` on a bare connection
    (the first fifth warms the caches up and is not counted)."""
    conn = sqlite3.connect(path)  # implicit BEGIN before a write, as the daemon's driver does
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "wal_autocheckpoint=0"):
        conn.execute(f"PRAGMA {pragma}")
    warm = len(batches) // 5
    for i, statements in enumerate(batches):
        if i == warm:
            start = time.thread_time()
        for sql, params, many in statements:
            if sql is None:
                conn.commit()
            elif many:
                conn.executemany(sql, params)
            else:
                conn.execute(sql, params).fetchall()
    conn.close()
    return (time.thread_time() - start) * 1000 / ((len(batches) - warm) * batch)


def sql_floor(batch: int, messages: int = 2000) -> tuple[float, float]:
    """(SQLite's CPU ms a message, statements a batch) for the writer's SQL."""
    with common.Sandbox("ceiling-sql") as box:
        box.init_db()
        box.mailboxes(["writer"])
        snapshot = box.dir / "before.db"
        with contextlib.closing(box.db()) as src, contextlib.closing(sqlite3.connect(snapshot)) as dst:
            src.backup(dst)
        batches = record_batches(box, batch, messages)
        statements = sum(1 for b in batches for sql, _p, _m in b if sql is not None)
        return replay(snapshot, batches, batch), statements / len(batches)


def report(targets: list[Target]) -> None:
    """Median rate per target, its rounds, its ratio to MailDev, daemon CPU."""
    maildev = common.median(next(t for t in targets if t.name.startswith("MailDev")).rates)
    rows = []
    for t in targets:
        med = common.median(t.rates)
        cpu = f"{common.median(t.cpu):.3f}" if t.pids else "-"
        rows.append([t.name, TRIALS.get(t.name, "peer"), f"{med:,.0f}", " ".join(f"{r:.0f}" for r in t.rates),
                     cpu, common.ratio(med, maildev)])
    print(common.table(rows, ["target", "what it does", "median msg/s", "rounds",
                              "daemon CPU ms/msg", "/ MailDev warm"]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Upper bounds of the reused-connection row.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=12000)
    parser.add_argument("--trials", default=",".join(TRIALS))
    parser.add_argument("--sql-floor", action="store_true", help="also SQLite's own share of storing")
    parser.add_argument("--batch", type=int, default=4, help="--sql-floor's messages a batch")
    parser.add_argument("--quick", action="store_true", help="1 round of 3,000 messages")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.messages = 1, 3000
    load = os.getloadavg()
    print(f"reused-connection row, smtp-source -s 8 -d -l 2048, {args.messages} messages x {args.rounds} "
          f"rounds ({common.machine_line()})")
    with contextlib.ExitStack() as stack:
        targets = [start_trial(t, stack) for t in args.trials.split(",") if t]
        for t in targets:
            run_load(t, 500)  # first connections, first statements
        targets += start_peers(stack, args.messages)
        for rnd in range(args.rounds):
            for t in targets if rnd % 2 == 0 else targets[::-1]:
                rate, cpu = run_load(t, args.messages)
                t.rates.append(rate)
                t.cpu.append(cpu)
                common.log(f"  round {rnd + 1} {t.name:>14}: {rate:7.0f} msg/s")
    report(targets)
    if args.sql_floor:
        floor, statements = sql_floor(args.batch)
        print(f"SQLite alone, the writer's SQL for batches of {args.batch} 2 KB messages ({statements:.1f} "
              f"statements a batch, COMMIT without fsync) on a bare connection: {floor:.3f} ms of CPU a message")
    print(f"load average at the start: {load[0]:.2f}, at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--record":
        record_main(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
    elif len(sys.argv) > 2 and sys.argv[1] == "--daemon":
        daemon_main(sys.argv[2], sys.argv[4:] if sys.argv[3:4] == ["--"] else sys.argv[3:])
    else:
        main()
