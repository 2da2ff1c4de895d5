"""Profile TempMail under the bench's own load with py-spy, and print where the time goes.

Two targets, each started exactly as ``make run`` starts it, in a sandbox:

* ``smtp``: the mail daemon (``flask smtpd``) while ``smtp-source`` sends
  2 KB messages (``--mode new`` a new connection per message, ``reuse``
  with ``-d``, ``attach`` 100 KB messages with an attachment from
  ``bench/smtpload.py``);
* ``http``: the gunicorn workers while wrk loads one endpoint
  (``--endpoint inbox|email|messages``).

py-spy samples the process tree for ``--seconds``; the raw stacks are kept
in ``bench/results/`` (for a flame graph: ``py-spy``'s own formats, or
https://www.speedscope.app from the .txt) and summarised here: the share
of samples per thread, the functions with the most samples of their own
(leaf frames), and the frames present in the most samples (inclusive).

Run: ``.venv/bin/python bench/spy.py smtp --mode new --seconds 15 [--native] [--gil]``
"""
from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import smtpload  # noqa: E402
import wrkutil  # noqa: E402



def record(pids: list[int], seconds: float, out: Path, native: bool, gil: bool) -> list[Path]:
    """py-spy record on every pid at once (raw collapsed stacks); returns the files."""
    procs, files = [], []
    for pid in pids:
        path = out.with_name(f"{out.stem}-{pid}.txt")
        cmd = [str(common.VENV_BIN / "py-spy"), "record", "--pid", str(pid), "--duration", str(int(seconds)),
               "--format", "raw", "--output", str(path), "--threads", "--idle", "--nolineno", "--rate", "100",
               ]
        cmd += [] if native else ["--nonblocking"]  # py-spy refuses --native with --nonblocking
        cmd += ["--native"] if native else []
        cmd += ["--gil"] if gil else []
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
        files.append(path)
    for proc in procs:
        _out, err = proc.communicate(timeout=seconds + 120)
        if proc.returncode != 0:
            common.log(f"py-spy: {err.decode(errors='replace')[-400:]}")
    return [f for f in files if f.exists()]


def frame_name(frame: str) -> str:
    """``func (path/file.py)`` -> ``func (file.py)``; native frames as they are."""
    match = re.match(r"(.*) \((.*)\)$", frame)
    if not match:
        return frame
    return f"{match.group(1)} ({Path(match.group(2)).name})"


def parse_stacks(files: list[Path]):
    """Yield ``(thread label, frames, count)`` from py-spy's raw output; the
    first frame of each stack names the thread (``thread (TID): NAME``)."""
    for path in files:
        pid = path.stem.rsplit("-", 1)[-1]
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            frames = stack.split(";")
            thread = frames[0].split(":", 1)[-1].strip() if frames[0].startswith(("thread", "process")) else "?"
            yield f"pid {pid} {thread}", [frame_name(f) for f in frames[1:]], int(count)


def summarise(files: list[Path], top: int, merge_threads: bool = False) -> str:
    """Per thread: its share of the samples, the functions with the most
    samples of their own (leaf frames) and the frames present in the most
    samples (inclusive), as text. With ``--idle`` (always on here) a thread
    waiting in a lock, poll() or a queue is sampled too, so the shares are
    of wall time."""
    threads: dict = collections.defaultdict(lambda: (collections.Counter(), collections.Counter()))
    sizes, total = collections.Counter(), 0
    for thread, frames, n in parse_stacks(files):
        if merge_threads:  # gunicorn's request threads do the same work: one summary per worker
            thread = thread.split(" ")[0] + " " + thread.split(" ")[1] + " (all threads)"
        total += n
        sizes[thread] += n
        leaves, inclusive = threads[thread]
        if frames:
            leaves[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return "no samples (is py-spy allowed to ptrace?)"
    out = [f"{total} samples"]
    for thread, size in sizes.most_common():
        if size < total * 0.02:
            continue
        leaves, inclusive = threads[thread]
        pct = lambda n: f"{100 * n / size:5.1f}%"
        out.append(f"\n== {thread}: {size} samples ({100 * size / total:.0f}% of all)")
        out.append(f"  top {top} own (leaf frame), % of this thread:")
        out += [f"    {pct(n)}  {name}" for name, n in leaves.most_common(top)]
        out.append(f"  top {top} inclusive:")
        out += [f"    {pct(n)}  {name}" for name, n in inclusive.most_common(top + 12)[12:]]
    return "\n".join(out)


def profile_smtp(args, box: common.Sandbox, out: Path) -> list[Path]:
    box.init_db()
    box.mailboxes(["ingest"])
    run = box.start_make_run()
    time.sleep(1)
    pids = box.pids(run, "smtpd")
    # The supervisor (several processes) serves nothing itself: profile the receivers.
    pids = pids[1:] or pids
    load = smtpload.Load(args.mode, box.smtp_port, f"ingest@{common.DOMAIN}", box.dir)
    load.start(seconds=args.seconds + 5)
    time.sleep(2)
    try:
        files = record(pids, args.seconds, out, args.native, args.gil)
    finally:
        sent = load.stop()
    common.log(f"stored {box.count('messages')} messages ({sent} sent)")
    return files


def profile_http(args, box: common.Sandbox, out: Path) -> list[Path]:
    import http_api
    targets = http_api.fill_tempmail(box)
    url, headers, workers = targets[http_api.ENDPOINTS[args.endpoint]]
    cmd = [common.ensure_wrk(), "-t2", "-c50", f"-d{int(args.seconds) + 4}s", "--latency"]
    for k, v in headers.items():
        cmd += ["-H", f"{k}: {v}"]
    wrk = subprocess.Popen(cmd + [url], stdout=subprocess.PIPE, text=True)
    time.sleep(2)
    files = record(workers, args.seconds, out, args.native, args.gil)
    res = wrkutil.parse(wrk.communicate()[0])
    common.log(f"wrk: {res.rps:,.0f} req/s p99 {res.p99_ms:.1f} ms errors {res.errors}")
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="py-spy profile of TempMail under the bench load.")
    parser.add_argument("target", choices=["smtp", "http"])
    parser.add_argument("--mode", choices=["new", "reuse", "attach"], default="new")
    parser.add_argument("--endpoint", choices=["inbox", "email", "messages"], default="inbox")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    parser.add_argument("--gil", action="store_true", help="only samples holding the GIL")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--config", default="{}", help="JSON merged into the sandbox config")
    parser.add_argument("--processes", type=int, help="smtp.processes")
    args = parser.parse_args(argv)
    common.ensure_profilers()
    out_dir = common.BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    label = args.mode if args.target == "smtp" else args.endpoint
    out = out_dir / f"profile-{args.target}-{label}-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    print(f"profile {args.target} {label} {'--native ' if args.native else ''}{'--gil ' if args.gil else ''}"
          f"({common.machine_line()})")
    import json
    with common.Sandbox("profile", processes=args.processes, **json.loads(args.config)) as box:
        files = profile_smtp(args, box, out) if args.target == "smtp" else profile_http(args, box, out)
        print(summarise(files, args.top, merge_threads=args.target == "http"))
    print(f"raw stacks: {', '.join(str(f) for f in files)}")


if __name__ == "__main__":
    main()
