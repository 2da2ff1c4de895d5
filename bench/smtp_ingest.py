"""Benchmark 1: SMTP ingest as shipped, side by side with MailDev and smtp-sink.

TempMail runs as ``make run`` starts it (``deploy/run.sh``: gunicorn and
``flask smtpd``, default configuration: the duplicate filter on,
``smtp.processes`` as shipped).
The loads, server after server inside every round (so a burst of noise on
a shared machine hits them all alike), the figure being the median:

* ``new``:    ``smtp-source -s 8 -m 5000 -l 2048``, a new connection per message;
* ``reuse``:  the same with ``-d`` (messages reuse their connection);
* ``attach``: ~100 KB messages with a base64 attachment, a new connection
  per message, 8 sessions (``bench/smtpload.py``: every message differs,
  since ``smtp-source -F`` would repeat identical bytes that the filter
  stores once);
* ``rounds``: 3 rounds of 2,000 new-connection messages into one fresh
  mailbox: the rate must not fall as the mailbox grows.

Rates count what each server stored (rows in TempMail's SQLite, ``.eml``
files in MailDev's mail directory) over the wall time; a run still going
after ``--cap`` seconds is stopped and rated on what was stored by then.
smtp-sink stores nothing: it is the ceiling of the protocol (and of the
load generators) on this machine. MailDev is warmed up first (its JIT).

``--compare DIR`` adds ``make run`` of another checkout (e.g. ``git
archive main`` unpacked) as a second TempMail target in the same run: an
A/B comparison under the same noise. ``--processes N`` (and
``--compare-processes N``) set ``smtp.processes`` in the sandbox config.

Run: ``.venv/bin/python bench/smtp_ingest.py`` (``--quick`` for a smoke run).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import smtpload  # noqa: E402

MODES = {
    "new": "SMTP 2 KB, new connection per message (smtp-source -s 8)",
    "reuse": "SMTP 2 KB, reused connections (smtp-source -s 8 -d)",
    "attach": "SMTP 100 KB with an attachment, new connection (8 sessions)",
}
RCPT = "ingest"
ROUNDS_RCPT = "rounds"


@dataclass
class Target:
    """One server under load and how to count what it has stored."""
    name: str
    port: int
    stored: Callable[[str], int]  # messages stored for a recipient local part
    rates: dict = field(default_factory=dict)


def run_once(target: Target, mode: str, rcpt: str, messages: int, cap: float) -> float:
    """One load run against ``target``; messages stored per second."""
    cmd, env = smtpload.source_cmd(mode, target.port, f"{rcpt}@{common.DOMAIN}", messages)
    if mode == "attach":
        cmd += ["--cap", f"{cap - 0.3:.1f}"]  # stops by itself and says how many got their 250
    before = target.stored(rcpt)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=cap)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    elapsed = time.monotonic() - start
    if proc.returncode not in (0, -9) and err:
        common.log(f"  {target.name}: load said: {err.decode(errors='replace').strip()[:300]}")
    if target.name == "smtp-sink":
        answered = re.search(rb"ok=(\d+)", out or b"")
        if answered:
            return int(answered.group(1)) / elapsed
        return messages / elapsed if proc.returncode == 0 else float("nan")
    time.sleep(0.2)  # a capped run: let replies already in flight be counted
    return (target.stored(rcpt) - before) / elapsed


def tempmail_counter(box: common.Sandbox) -> Callable[[str], int]:
    def count(rcpt: str) -> int:
        return box.count("messages m JOIN mailboxes b ON b.id = m.mailbox_id", "WHERE b.username = ?",
                         (rcpt,))
    return count


def maildev_counter(maildir: Path) -> Callable[[str], int]:
    """MailDev keeps one .eml per message; its envelope is in a .json beside
    it only in memory, so the recipient is read from the file's To header."""
    seen: dict = {}

    def count(rcpt: str) -> int:
        for path in maildir.glob("*.eml"):
            if path.name not in seen:
                with contextlib.suppress(OSError):
                    head = path.read_bytes()[:2048].lower()
                    seen[path.name] = next((r for r in (RCPT, ROUNDS_RCPT)
                                            if f"{r}@".encode() in head), "")
        return sum(1 for r in seen.values() if r == rcpt)
    return count


def start_tempmail(name: str, code: Path, processes: int | None, stack: contextlib.ExitStack) -> Target:
    """``make run`` of checkout ``code`` (deploy/run.sh: gunicorn and flask smtpd) in a sandbox."""
    box = stack.enter_context(common.Sandbox("ingest", code=code, processes=processes))
    box.init_db()
    box.mailboxes([RCPT, ROUNDS_RCPT])
    box.start_make_run()
    time.sleep(0.5)
    return Target(name, box.smtp_port, tempmail_counter(box))


def start_targets(args, stack: contextlib.ExitStack) -> list[Target]:
    """TempMail (this tree, then ``--compare``'s) and the peers, all listening."""
    targets = [start_tempmail("TempMail", common.ROOT, args.processes, stack)]
    if args.compare:
        targets.append(start_tempmail(f"TempMail@{Path(args.compare).name}", Path(args.compare),
                                      args.compare_processes or args.processes, stack))
    peers = [p for p in args.peers.split(",") if p]
    box = stack.enter_context(common.Sandbox("peers"))
    if "maildev" in peers:
        server, _web = common.start_maildev(box)
        targets.append(Target("MailDev 2.2.1", server.port, maildev_counter(box.dir / "maildev")))
        warm_up(targets[-1], args)
    if "sink" in peers:
        server = common.start_smtp_sink(box)
        targets.append(Target("smtp-sink", server.port, lambda _r: 0))
    return targets


def warm_up(target: Target, args) -> None:
    """A first burst so a JIT-compiled peer is measured warm, as a user running it would see it."""
    common.log(f"  warming up {target.name}")
    for mode in ("reuse", "new"):
        run_once(target, mode, "warmup", 1000 if args.quick else 3000, args.cap * 2)


def report(title: str, key: str, targets: list[Target]) -> list[list]:
    """Print the median and rounds per target and the ratio of TempMail to each."""
    ours = common.median(targets[0].rates[key])
    rows = []
    for t in targets:
        med = common.median(t.rates[key])
        runs = " ".join(f"{r:.0f}" for r in t.rates[key])
        rows.append([t.name, f"{med:,.0f}", runs, "-" if t is targets[0] else common.ratio(ours, med)])
    print(f"\n{title}")
    print(common.table(rows, ["server", "median msg/s", "rounds", "TempMail / server"]))
    return rows


def growth_rounds(targets: list[Target], args) -> dict:
    """``--growth-rounds`` rounds of ``--growth-messages`` into one fresh mailbox, per server."""
    out = {}
    for t in targets:
        if t.name == "smtp-sink":
            continue
        rates = [run_once(t, "new", ROUNDS_RCPT, args.growth_messages, args.growth_cap)
                 for _ in range(args.growth_rounds)]
        common.log(f"  [rounds] {t.name}: {' -> '.join(f'{r:.0f}' for r in rates)} msg/s")
        out[t.name] = rates
    print(f"\n{args.growth_rounds} rounds of {args.growth_messages:,} messages (new connection, "
          f"smtp-source -s 8) into one fresh mailbox, msg/s")
    rows = [[name, " -> ".join(f"{r:,.0f}" for r in rates),
             f"{(rates[-1] / rates[0] - 1) * 100:+.0f}%" if rates[0] else "n/a"] for name, rates in out.items()]
    print(common.table(rows, ["server", "rounds", "last vs first"]))
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="SMTP ingest benchmark, TempMail as shipped vs peers.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=5000, help="messages per run")
    parser.add_argument("--cap", type=float, default=6.0,
                        help="seconds before a run is stopped and rated on what was stored")
    parser.add_argument("--modes", default="new,reuse,attach,rounds")
    parser.add_argument("--peers", default="maildev,sink")
    parser.add_argument("--growth-rounds", type=int, default=3)
    parser.add_argument("--growth-messages", type=int, default=2000)
    parser.add_argument("--growth-cap", type=float, default=120.0)
    parser.add_argument("--processes", type=int, help="smtp.processes for this tree's daemon (default: as shipped)")
    parser.add_argument("--compare", help="another checkout of TempMail to run beside this one (A/B)")
    parser.add_argument("--compare-processes", type=int, help="smtp.processes for --compare's daemon")
    parser.add_argument("--json", help="write the medians to this file (run_all.py reads it)")
    parser.add_argument("--quick", action="store_true", help="1 round of 1000 messages, rounds of 500")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.messages, args.cap, args.growth_messages = 1, 1000, 4.0, 500
    modes = [m for m in args.modes.split(",") if m]
    print(f"SMTP ingest  ({common.machine_line()})")
    print(f"TempMail as `make run` starts it (default config, duplicate filter on); "
          f"{args.rounds} rounds of {args.messages} messages, cap {args.cap:.0f}s per run")
    results: dict = {"load_start": common.os.getloadavg()[0]}
    with contextlib.ExitStack() as stack:
        targets = start_targets(args, stack)
        for mode in [m for m in modes if m in MODES]:
            for t in targets:
                t.rates[mode] = []
            for rnd in range(args.rounds):
                for t in targets:
                    rate = run_once(t, mode, RCPT, args.messages, args.cap)
                    t.rates[mode].append(rate)
                    common.log(f"  [{mode} round {rnd + 1}] {t.name}: {rate:,.0f} msg/s")
            report(MODES[mode], mode, targets)
        if "rounds" in modes:
            results["rounds"] = growth_rounds(targets, args)
            results["growth_messages"] = args.growth_messages
    results["load_end"] = common.os.getloadavg()[0]
    results["medians"] = {t.name: {m: common.median(r) for m, r in t.rates.items()} for t in targets}
    print(f"load average at the end: {results['load_end']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
