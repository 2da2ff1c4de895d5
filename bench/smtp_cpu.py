"""The mail daemon's CPU time per message under smtp-source load, A/B in one run.

On a shared 2-core machine a served rate moves with whatever else runs; the
CPU the daemon spends per stored message moves far less. This starts
``flask smtpd`` (as ``make run`` starts it: default config, the duplicate
filter on, ``smtp.processes`` as shipped) of this tree and of ``--compare``
checkouts, each in its own sandbox, then alternates rounds of
``smtp-source -s 8 -m N -l 2048`` (``--mode new``: a new connection per
message; ``reuse``: ``-d``) between them and prints, per round and as
medians: stored msg/s, the daemon's CPU per message (user and system, all
its processes, from ``/proc/PID/stat``), smtp-source's CPU per message, and
the load average.

Run: ``.venv/bin/python bench/smtp_cpu.py --mode new --compare /tmp/base``
"""
from __future__ import annotations

import argparse
import contextlib
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import smtpload  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
RCPT = "ingest"


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of ``pids`` so far."""
    user = system = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11]) / TICK
            system += int(fields[12]) / TICK
    return user, system


def thread_cpu(pids: list[int]) -> dict:
    """CPU seconds (user + system) per thread name over ``pids`` (the daemon
    names its I/O thread ``smtpd-io`` and its writer ``smtpd-writer``)."""
    out: dict = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    name = (task / "comm").read_text().strip()
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                    out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return out


def run_round(box: common.Sandbox, pids: list[int], mode: str, messages: int) -> dict:
    """One smtp-source run; rate and CPU per stored message."""
    cmd, env = smtpload.source_cmd(mode, box.smtp_port, f"{RCPT}@{common.DOMAIN}", messages)
    before, cpu0, threads0 = box.count(), cpu_seconds(pids), thread_cpu(pids)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    start = time.monotonic()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    elapsed = time.monotonic() - start
    cpu1, kids1 = cpu_seconds(pids), resource.getrusage(resource.RUSAGE_CHILDREN)
    threads1 = thread_cpu(pids)
    stored = box.count() - before
    per = 1000 / max(stored, 1)
    io = (threads1.get("smtpd-io", 0) - threads0.get("smtpd-io", 0)) * per
    writer = (threads1.get("smtpd-writer", 0) - threads0.get("smtpd-writer", 0)) * per
    return {"rate": stored / elapsed, "user": (cpu1[0] - cpu0[0]) * per, "sys": (cpu1[1] - cpu0[1]) * per,
            "client": ((kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)) * per,
            "io": io, "writer": writer, "load": load, "stored": stored}


def start(code: Path, processes: int | None, stack: contextlib.ExitStack) -> tuple[common.Sandbox, list[int]]:
    box = stack.enter_context(common.Sandbox("smtpcpu", code=code, processes=processes))
    box.init_db()
    box.mailboxes([RCPT])
    server = box.start_smtpd()
    time.sleep(1.0)
    return box, box.pids(server, "smtpd")


def describe(res: dict) -> str:
    """One line of figures: rate, daemon CPU per message (and its split), load."""
    return (f"{res['rate']:6.0f} msg/s  daemon {res['user'] + res['sys']:.3f} ms/msg (user {res['user']:.3f} "
            f"sys {res['sys']:.3f}; I/O thread {res['io']:.3f}, writer {res['writer']:.3f})  "
            f"smtp-source {res['client']:.3f} ms/msg" + (f"  load {res['load']:.2f}" if "load" in res else ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Mail daemon CPU per message, A/B.")
    parser.add_argument("--mode", choices=["new", "reuse", "attach"], default="new")
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--processes", type=int, help="smtp.processes (default: as shipped)")
    parser.add_argument("--compare", action="append", default=[], help="another checkout (repeatable)")
    args = parser.parse_args(argv)
    print(f"daemon CPU per message, smtp-source --mode {args.mode}, {args.messages} messages x "
          f"{args.rounds} rounds ({common.machine_line()})")
    rows: dict = {}
    with contextlib.ExitStack() as stack:
        targets = [(name, *start(Path(code), args.processes, stack))
                   for name, code in [("this", common.ROOT)] + [(Path(c).name, c) for c in args.compare]]
        for name, box, pids in targets:  # warm-up: first connections, first statements
            run_round(box, pids, args.mode, 300)
        for rnd in range(args.rounds):
            for name, box, pids in targets if rnd % 2 == 0 else targets[::-1]:
                res = run_round(box, pids, args.mode, args.messages)
                rows.setdefault(name, []).append(res)
                print(f"  round {rnd + 1} {name:>14}: {describe(res)}", flush=True)
    print("medians:")
    for name, res in rows.items():
        medians = {key: common.median([r[key] for r in res]) for key in res[0] if key != "load"}
        print(f"  {name:>14}: {describe(medians)}")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
