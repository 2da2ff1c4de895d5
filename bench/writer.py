"""The daemon's writer thread in-process: CPU and wall time per message of
``smtpserver.store_batch``, and the SQL statements it runs per batch.

No network, no other thread: the cost of storing, durably (fsync on), as
the daemon's writer pays it for one batch of ``--batch`` messages. CPU time
(``thread_time``) is much less disturbed by other work on a shared machine
than wall time, so it is the figure to compare changes with. ``--code DIR``
runs another checkout's code (A/B: run it once per checkout, or
``--compare DIR`` runs both, alternating, in one invocation).

``--steps`` also prints the thread CPU of each step of a batch (parsing, the
look-ups, the INSERTs, the commit, the WAL fsync, ...) per message: each
step's function wrapped with a ``thread_time`` pair, which costs ~1 us a
call, where cProfile charges cheap calls many times their cost.

Run: ``.venv/bin/python bench/writer.py [--kind 2k|attach] [--batch 8] [--messages 2000] [--steps]``
"""
from __future__ import annotations

import argparse
import collections
import functools
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import smtpload  # noqa: E402


def two_kb_message(rcpt: str, n: int) -> bytes:
    """What ``smtp-source -l 2048`` sends: four headers and 2 KB of text."""
    body = ("X" * 78 + "\r\n") * 26
    return (f"From: <sender@source.test>\r\nTo: <{rcpt}>\r\nDate: Mon, 30 Nov 2026 10:00:00 +0000\r\n"
            f"Message-Id: <{n:08x}.{os.getpid():04x}@source.test>\r\n\r\n{body}").encode()


# The steps ``--steps`` times: (module, attribute path); a step the measured
# checkout lacks is left out. Nested steps count inside their callers too.
STEPS = [("smtpserver", "store_batch"), ("mailhandler", "DeliveryBatch.look_up_earlier"),
         ("mailhandler", "DeliveryBatch.look_up_recipients"), ("mailhandler", "deliver"),
         ("mailhandler", "parse_message"), ("mailhandler", "store_copy"), ("mailhandler", "DeliveryBatch.commit"),
         ("mailhandler", "insert_rows"), ("storage", "PendingBlobs.reference"), ("models", "Stat.bump"),
         ("storage", "commit_durably"), ("writelock", "QueuedWriterConnection.commit"),
         ("walsync", "sync"), ("mailevents", "delivered"), ("mailhandler", "log_accepted")]


def time_steps(spent: collections.Counter) -> None:
    """Wrap each of STEPS so that its thread CPU time adds up in ``spent``."""
    for module_name, path in STEPS:
        owner = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent, None)
        func = getattr(owner, name, None) if owner is not None else None
        if func is None:
            continue

        def timed(*args, _func=func, _label=path, **kwargs):
            start = time.thread_time()
            try:
                return _func(*args, **kwargs)
            finally:
                spent[_label] += time.thread_time() - start
        setattr(owner, name, functools.wraps(func)(timed))


def measure(kind: str, batch: int, messages: int, dedupe: bool, profile: str = "", steps: bool = False) -> dict:
    """Runs in the child: store ``messages`` in batches, return the figures."""
    from sqlalchemy import event
    import smtpserver
    from app import create_app
    from models import db
    app = create_app()
    statements = [0]
    with app.app_context():
        event.listen(db.engine, "before_cursor_execute", lambda *a: statements.__setitem__(0, statements[0] + 1))
        count_raw_statements(statements)
        rcpt = f"writer@{common.DOMAIN}"
        make = two_kb_message if kind == "2k" else (lambda r, n: smtpload.attachment_message(r, n, "w"))
        raws = [make(rcpt, n) for n in range(messages)]
        cpu, wall, stored = [], [], 0
        profiler, spent, warm = None, collections.Counter(), (messages // batch // 10) * batch
        if profile:  # cProfile of the batches after the first tenth (caches warm)
            import cProfile
            profiler = cProfile.Profile()
        if steps:
            time_steps(spent)
        for start in range(0, messages, batch):
            jobs = [smtpserver.Job(bytearray(raw), [rcpt], "sender@source.test", "bench", None)
                    for raw in raws[start:start + batch]]
            if start == warm:
                spent.clear()  # steps, like the profile, count from the first tenth on
                if profiler:
                    profiler.enable()
            c0, w0 = time.thread_time(), time.perf_counter()
            smtpserver.store_batch(jobs)
            cpu.append((time.thread_time() - c0) / len(jobs))
            wall.append((time.perf_counter() - w0) / len(jobs))
            stored += sum(1 for j in jobs if j.reply.startswith("250"))
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile)
        skip = len(cpu) // 10  # the first batches warm caches up
        return {"cpu_ms": statistics.median(cpu[skip:]) * 1000, "wall_ms": statistics.median(wall[skip:]) * 1000,
                "statements_per_batch": statements[0] / len(cpu), "stored": stored,
                "steps": {k: v * 1000 / (messages - warm) for k, v in spent.items()}}


def count_raw_statements(statements: list) -> None:
    """Count the statements run on the raw DBAPI cursor too (``database.Prepared``,
    where the code has it), beside those SQLAlchemy runs."""
    import database
    prepared = getattr(database, "Prepared", None)
    if prepared is None:
        return
    run = prepared.run

    def counted(self, cursor, **params):
        statements[0] += 1
        return run(self, cursor, **params)
    prepared.run = counted


def run_child(code: Path, args) -> dict:
    """A fresh sandbox and process running ``code``'s store_batch."""
    with common.Sandbox("writer", code=code, **({} if args.dedupe else {"dedupe_window_seconds": 0})) as box:
        box.init_db()
        box.mailboxes(["writer"])
        cmd = [str(common.PYTHON), str(Path(__file__).resolve()), "--child", "--kind", args.kind,
               "--batch", str(args.batch), "--messages", str(args.messages)] + (["--dedupe"] if args.dedupe else [])
        cmd += ["--profile", str(Path(args.profile).resolve())] if args.profile else []
        cmd += ["--steps"] if args.steps else []
        env = box.env()
        env["PYTHONPATH"] = f"{code}:{common.BENCH}"
        res = subprocess.run(cmd, env=env, cwd=code, capture_output=True, text=True, timeout=900)
        if res.returncode != 0:
            raise RuntimeError(res.stderr[-2000:])
        return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Writer cost per message, in-process.")
    parser.add_argument("--kind", choices=["2k", "attach"], default="2k")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--no-dedupe", dest="dedupe", action="store_false", help="filter off")
    parser.add_argument("--dedupe", action="store_true", default=True, help=argparse.SUPPRESS)
    parser.add_argument("--code", default=str(common.ROOT))
    parser.add_argument("--compare", help="another checkout, measured alternately with --code")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", default="", help="write a cProfile of the child's batches to this file "
                        "(read it with: python -m pstats FILE)")
    parser.add_argument("--steps", action="store_true", help="also the thread CPU of each step, per message")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.kind, args.batch, args.messages, args.dedupe, args.profile, args.steps)))
        return
    print(f"writer, {args.kind} messages, batches of {args.batch}, {args.messages} messages, "
          f"filter {'on' if args.dedupe else 'off'}  ({common.machine_line()})")
    codes = [Path(args.code)] + ([Path(args.compare)] if args.compare else [])
    results = {c: [] for c in codes}
    for rep in range(args.repeat):
        for code in codes:
            res = run_child(code, args)
            results[code].append(res)
            common.log(f"  [{rep + 1}] {code}: cpu {res['cpu_ms']:.3f} ms/msg wall {res['wall_ms']:.3f} "
                       f"ms/msg, {res['statements_per_batch']:.1f} statements/batch, stored {res['stored']}")
    rows = [[str(code), f"{statistics.median(r['cpu_ms'] for r in rs):.3f}",
             f"{statistics.median(r['wall_ms'] for r in rs):.3f}",
             f"{statistics.median(r['statements_per_batch'] for r in rs):.1f}"] for code, rs in results.items()]
    print(common.table(rows, ["code", "CPU ms/msg (median)", "wall ms/msg", "statements/batch"]))
    if args.steps:
        print_steps(results)
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


def print_steps(results: dict) -> None:
    """Each step's thread CPU per message (median of the repeats), per checkout."""
    codes = list(results)
    labels = [path for _module, path in STEPS if any(path in r.get("steps", {}) for rs in results.values() for r in rs)]
    rows = [[label] + [f"{statistics.median(r['steps'].get(label, 0.0) for r in results[code]):.3f}" for code in codes]
            for label in labels]
    print("thread CPU per message, ms, by step (a step includes the steps it calls):")
    print(common.table(rows, ["step"] + [code.name for code in codes]))


if __name__ == "__main__":
    main()
