"""``make bench``: every figure of issue 13, as shipped, beside its peers, in one run.

Runs the scripts one after the other, each in its own process (their own
output goes to the terminal and to ``bench/results/<date>.txt``, git-ignored),
then prints one table: each figure for TempMail as ``make run`` serves it
(default configuration, duplicate filter on), MailDev 2.2.1 (warmed up
first) and smtp-sink (the ceiling), the ratios, the targets and whether
they are met, with the load average at the start (figures taken with a load
average above 1 are not idle-machine figures: the table says so).

* ``smtp_ingest``: SMTP 2 KB new connection / reused connections / 100 KB
  with an attachment, and 3 rounds of 2,000 into one mailbox;
* ``http_api``: ``/api.php/inbox/{email}``, ``/api.php/email/{id}``,
  ``/api/messages?email=`` under wrk -c50, beside MailDev's REST API;
* ``memory``: the daemon's peak RSS for a 25 MiB message (< 200 MiB).

``--all`` adds ``delivery_latency``, ``scale``, ``capacity`` (issue 14:
ordinary requests per second with 1,000 long polls and streams held) and
``ceiling`` (what the reused-connection row could reach with parts of the
writer taken out). A
failing script is reported, the others still run.

Run: ``.venv/bin/python bench/run_all.py [--quick] [--only smtp_ingest,http_api] [--all]``
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPTS = ["smtp_ingest", "http_api", "memory"]
EXTRA = ["delivery_latency", "scale", "capacity", "ceiling"]
WITH_JSON = {"smtp_ingest", "http_api", "memory"}
MAILDEV = "MailDev 2.2.1"


def run_script(name: str, quick: bool, out_dir: Path, fh) -> tuple[bool, dict]:
    """One script in its own process; its figures (when it writes JSON)."""
    json_path = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".json", dir=out_dir)[1])
    cmd = [str(common.PYTHON), str(common.BENCH / f"{name}.py")] + (["--quick"] if quick else [])
    if name in WITH_JSON:
        cmd += ["--json", str(json_path)]
    common.log(f"== {name}")
    start = time.monotonic()
    res = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=common.ROOT)
    text = f"== {name} ({time.monotonic() - start:.0f} s)\n{res.stdout}\n"
    print(text, flush=True)
    fh.write(text)
    figures = {}
    if name in WITH_JSON and json_path.stat().st_size:
        figures = json.loads(json_path.read_text())
    json_path.unlink(missing_ok=True)
    return res.returncode == 0, figures


def fmt(value: float, unit: str = "") -> str:
    return "-" if value != value else f"{value:,.0f}{unit}"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "MISSED")


def smtp_rows(fig: dict) -> list[list]:
    med = fig.get("medians", {})
    ours, dev, sink = med.get("TempMail", {}), med.get(MAILDEV, {}), med.get("smtp-sink", {})
    nan = float("nan")
    rows = []
    specs = [("new", "SMTP 2 KB, new connection per message (smtp-source -s 8)", ">= 1,500 msg/s (~20x MailDev)",
              lambda t, d: t >= 1500),
             ("reuse", "SMTP 2 KB, reused connections (-d)", ">= 1x MailDev warm", lambda t, d: t >= d),
             ("attach", "SMTP 100 KB with an attachment, new connection", ">= 5x MailDev", lambda t, d: t >= 5 * d)]
    for mode, title, target, check in specs:
        t, d, s = ours.get(mode, nan), dev.get(mode, nan), sink.get(mode, nan)
        ok = None if t != t or d != d else check(t, d)
        rows.append([title, fmt(t, " msg/s"), fmt(d, " msg/s"), fmt(s, " msg/s"), common.ratio(t, d),
                     target, verdict(ok)])
    rounds = fig.get("rounds", {})
    if rounds:
        ours_r, dev_r = rounds.get("TempMail", []), rounds.get(MAILDEV, [])
        show = lambda r: " -> ".join(f"{x:,.0f}" for x in r) if r else "-"
        ok = None if len(ours_r) < 2 or not ours_r[0] else ours_r[-1] >= 0.85 * ours_r[0]
        size = fig.get("growth_messages", 2000)
        rows.append([f"{len(ours_r)} rounds of {size:,} messages into one mailbox (msg/s)", show(ours_r),
                     show(dev_r), "-",
                     common.ratio(ours_r[-1], dev_r[-1]) if ours_r and dev_r else "n/a",
                     "round 3 within 15 % of round 1", verdict(ok)])
    return rows


def http_rows(fig: dict) -> list[list]:
    med = fig.get("medians", {})
    nan = {"rps": float("nan"), "p99": float("nan")}
    dev_list = med.get(f"{MAILDEV} GET /email", nan)
    dev_one = med.get(f"{MAILDEV} GET /email/{{id}}", nan)
    rows = []
    specs = [("TempMail /api.php/inbox/{email}", "GET /api.php/inbox/{email} (50 messages), wrk -c50", dev_list,
              "MailDev GET /email", 1.5, 50),
             ("TempMail /api.php/email/{id}", "GET /api.php/email/{id}, wrk -c50", dev_one,
              "MailDev GET /email/{id}", 1.5, 50),
             ("TempMail /api/messages?email=", "GET /api/messages?email= with a key (quota counted)", dev_list,
              "MailDev GET /email", 1.0, 100)]
    for key, title, peer, peer_name, times, p99_target in specs:
        t = med.get(key, nan)
        ok = None if t["rps"] != t["rps"] or peer["rps"] != peer["rps"] else (
            t["rps"] >= times * peer["rps"] and t["p99"] < p99_target)
        rows.append([title, f"{fmt(t['rps'], ' req/s')}, p99 {t['p99']:.0f} ms",
                     f"{fmt(peer['rps'], ' req/s')} ({peer_name}), p99 {peer['p99']:.0f} ms", "-",
                     common.ratio(t["rps"], peer["rps"]), f">= {times:g}x MailDev, p99 < {p99_target} ms",
                     verdict(ok)])
    return rows


def summary(figures: dict, load_start: float) -> str:
    rows = []
    if "smtp_ingest" in figures:
        rows += smtp_rows(figures["smtp_ingest"])
    if "http_api" in figures:
        rows += http_rows(figures["http_api"])
    if "memory" in figures:
        peak = figures["memory"].get("daemon_peak_mib", float("nan"))
        rows.append(["daemon peak RSS, one 25 MiB message", f"{peak:.0f} MiB", "-", "-", "-", "< 200 MiB",
                     verdict(None if peak != peak else peak < 200)])
    idle = "an idle machine" if load_start < 1 else "NOT an idle machine (load >= 1): relative figures only"
    head = (f"Issue 13 figures, TempMail as `make run` ships it  ({common.machine_line()})\n"
            f"load average at the start: {load_start:.2f} -> {idle}\n")
    return head + common.table(rows, ["figure", "TempMail", "MailDev 2.2.1", "smtp-sink (ceiling)",
                                      "TempMail / MailDev", "target", "verdict"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--only", help="comma-separated script names")
    parser.add_argument("--all", action="store_true", help="also " + ", ".join(EXTRA))
    args = parser.parse_args(argv)
    load_start = os.getloadavg()[0]
    common.log(f"load average at the start: {load_start:.2f}")
    common.ensure_profilers()
    out_dir = common.BENCH / "results"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.txt"
    names = args.only.split(",") if args.only else SCRIPTS + (EXTRA if args.all else [])
    failed, figures = [], {}
    with open(out, "w") as fh:
        fh.write(f"load average at the start: {load_start:.2f}\n")
        for name in [n for n in names if n]:
            ok, figs = run_script(name, args.quick, out_dir, fh)
            if figs:
                figures[name] = figs
            if not ok:
                failed.append(name)
        table = summary(figures, load_start)
        print("\n" + table, flush=True)
        fh.write("\n" + table + "\n")
    print(f"figures saved in {out}")
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
