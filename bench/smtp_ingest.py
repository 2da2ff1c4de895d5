"""Benchmark 1: SMTP ingest, TempMail side by side with its peers.

Postfix's ``smtp-source`` drives every server in turn, round after round
(TempMail, stock Salmon, MailDev, smtp-sink, then again), so a burst of
noise on this shared machine hits them all alike; the figure per server is
the median of the rounds. Three loads:

* ``new``:    ``smtp-source -s 8 -m 5000 -l 2048``, a new connection per message;
* ``reuse``:  the same with ``-d`` (messages reuse their connection);
* ``attach``: 100 KB messages with an attachment (``smtp-source -F file``).

Rates count what the server actually stored (rows in TempMail's and stock
Salmon's SQLite, files in MailDev's mail directory) over the wall time
(TempMail's duplicate filter is off here: ``-F`` repeats identical bytes); a
peer too slow to finish within ``--cap`` seconds is stopped there and rated
on what it stored so far. smtp-sink stores nothing: it is the ceiling of
the protocol on this machine.

Run: ``.venv/bin/python bench/smtp_ingest.py`` (``--quick`` for a smoke run).
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import os
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MODES = {
    "new": "2 KB, new connection per message",
    "reuse": "2 KB, reused connections (-d)",
    "attach": "100 KB with an attachment, new connection per message",
}
RCPT = "ingest"


@dataclass
class Target:
    """One server under load and how to count what it has stored."""
    name: str
    port: int
    stored: Callable[[], int]
    rates: dict = field(default_factory=dict)


def attachment_message(path: Path, size: int = 100 * 1024) -> Path:
    """A ~``size`` byte MIME message: a text part and a base64 binary attachment."""
    payload = base64.encodebytes(os.urandom(size * 3 // 4 - 600)).decode()
    path.write_text(
        "From: Bench Sender <sender@source.test>\n"
        f"To: {RCPT}@{common.DOMAIN}\n"
        "Subject: =?utf-8?q?Bench_attachment_=E2=9C=93?=\n"
        "MIME-Version: 1.0\n"
        'Content-Type: multipart/mixed; boundary="b1"\n\n'
        "--b1\nContent-Type: text/plain; charset=utf-8\n\nSee the attached report.\n\n"
        '--b1\nContent-Type: application/octet-stream; name="report.bin"\n'
        'Content-Disposition: attachment; filename="report.bin"\n'
        f"Content-Transfer-Encoding: base64\n\n{payload}\n--b1--\n")
    return path


def smtp_source_cmd(mode: str, port: int, messages: int, sessions: int, msgfile: Path) -> list[str]:
    binary, _env = common.postfix_tool("smtp-source")
    cmd = [binary, "-s", str(sessions), "-m", str(messages), "-f", "sender@source.test",
           "-t", f"{RCPT}@{common.DOMAIN}"]
    if mode == "attach":
        cmd += ["-F", str(msgfile)]
    else:
        cmd += ["-l", "2048"]
    if mode == "reuse":
        cmd.append("-d")
    return cmd + [f"127.0.0.1:{port}"]


def run_once(target: Target, cmd: list[str], cap: float) -> float:
    """Run one smtp-source load against ``target``; messages stored per second."""
    _binary, env = common.postfix_tool("smtp-source")
    before = target.stored()
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _out, err = proc.communicate(timeout=cap)
    except subprocess.TimeoutExpired:
        proc.kill()
        _out, err = proc.communicate()
    elapsed = time.monotonic() - start
    if proc.returncode not in (0, -9) and err:
        common.log(f"  {target.name}: smtp-source said: {err.decode(errors='replace').strip()[:300]}")
    if target.name == "smtp-sink":
        sent = int(cmd[cmd.index("-m") + 1])
        return sent / elapsed if proc.returncode == 0 else float("nan")
    time.sleep(0.2)  # a capped run: let replies already in flight be counted
    return (target.stored() - before) / elapsed


def sqlite_counter(path: Path, table: str) -> Callable[[], int]:
    def count() -> int:
        if not path.exists():
            return 0
        with contextlib.closing(sqlite3.connect(path, timeout=30)) as conn:
            return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    return count


def dir_counter(path: Path) -> Callable[[], int]:
    return lambda: sum(1 for _ in path.glob("*.eml"))


def start_targets(box: common.Sandbox, peers: list[str]) -> list[Target]:
    """TempMail's daemon plus the chosen peers, all started and listening."""
    box.init_db()
    box.mailboxes([RCPT])
    smtpd = box.start_smtpd()
    targets = [Target("TempMail", smtpd.port, lambda: box.count("messages"))]
    if "salmon" in peers:
        server, db_path = common.start_stock_salmon(box)
        targets.append(Target("stock Salmon", server.port, sqlite_counter(db_path, "messages")))
    if "maildev" in peers:
        server, _web = common.start_maildev(box)
        targets.append(Target("MailDev 2.2.1", server.port, dir_counter(box.dir / "maildev")))
    if "sink" in peers:
        server = common.start_smtp_sink(box)
        targets.append(Target("smtp-sink", server.port, lambda: 0))
    return targets


def report(mode: str, targets: list[Target]) -> None:
    ours = common.median(targets[0].rates[mode])
    rows = []
    for t in targets:
        med = common.median(t.rates[mode])
        runs = " ".join(f"{r:.0f}" for r in t.rates[mode])
        rows.append([t.name, f"{med:,.0f}", runs,
                     "-" if t is targets[0] else common.ratio(ours, med)])
    print(f"\n{MODES[mode]}")
    print(common.table(rows, ["server", "median msg/s", "rounds", "TempMail / server"]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="SMTP ingest benchmark, TempMail vs peers.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=5000, help="smtp-source -m")
    parser.add_argument("--sessions", type=int, default=8, help="smtp-source -s")
    parser.add_argument("--cap", type=float, default=6.0,
                        help="seconds before a slow run is stopped and rated on what it stored")
    parser.add_argument("--modes", default="new,reuse,attach")
    parser.add_argument("--peers", default="salmon,maildev,sink")
    parser.add_argument("--quick", action="store_true", help="1 round of 1000 messages")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.messages, args.cap = 1, 1000, 4.0
    modes = [m for m in args.modes.split(",") if m]
    print(f"SMTP ingest  ({common.machine_line()})")
    print(f"smtp-source -s {args.sessions} -m {args.messages}; {args.rounds} rounds, "
          f"cap {args.cap:.0f}s per run")
    # smtp-source -F sends the same bytes every time, which TempMail's
    # duplicate filter would store once; off, every message is parsed and
    # stored in full, as the benchmark means to measure.
    with common.Sandbox("ingest", dedupe_window_seconds=0) as box:
        targets = start_targets(box, args.peers.split(","))
        msgfile = attachment_message(box.dir / "attach.eml")
        for mode in modes:
            for t in targets:
                t.rates[mode] = []
            for rnd in range(args.rounds):
                for t in targets:
                    cmd = smtp_source_cmd(mode, t.port, args.messages, args.sessions, msgfile)
                    rate = run_once(t, cmd, args.cap)
                    t.rates[mode].append(rate)
                    common.log(f"  [{mode} round {rnd + 1}] {t.name}: {rate:,.0f} msg/s")
            report(mode, targets)
        attachments = box.count("attachments")
    print(f"\nTempMail stored {attachments} attachments in the attach runs (parsed, not just kept raw).")
    ours = common.median(targets[0].rates.get("new", []))
    maildev = next((common.median(t.rates["new"]) for t in targets
                    if t.name.startswith("MailDev") and "new" in t.rates), float("nan"))
    print(f"Targets (new connection, 2 KB): >= 1,500 msg/s: {ours:,.0f}; "
          f">= 10x MailDev: {common.ratio(ours, maildev)}; >= 5x Mailpit's published 300/s: "
          f"{common.ratio(ours, 300)}")
    return {t.name: {m: common.median(r) for m, r in t.rates.items()} for t in targets}


if __name__ == "__main__":
    main()
