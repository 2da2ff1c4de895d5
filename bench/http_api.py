"""Benchmark 3: the HTTP APIs under wrk, side by side with MailDev's REST API.

The web app runs as ``make run`` serves it (``deploy/run.sh``: gunicorn
with deploy/gunicorn.conf.py, access log on, metrics on); wrk opens 50
keep-alive connections. Every target gets a 2 s warm-up, then the targets
alternate round after round so noise hits all of them alike:

* ``GET /api.php/inbox/{email}``   a mailbox holding 50 messages (every fifth
  with a 20 KB attachment, delivered through the real daemon);
* ``GET /api.php/email/{id}``      one message with its attachment list (the
  id read from the inbox JSON: api.php ids are a keyed permutation);
* ``GET /api/messages?email=``     the User API listing (Bearer key, quota
  reserved and counted on every answer: a database write per request);
* MailDev 2.2.1 ``GET /email`` and ``GET /email/{id}``, holding the same
  50 messages: the peers.

``--compare DIR`` and ``--variant NAME:ENV=VALUE`` add more ``make run``s
(another checkout, or this one with e.g. ``TEMPMAIL_WORKERS=4``) loaded in
the same rounds: A/B comparisons under the same noise.

Run: ``.venv/bin/python bench/http_api.py`` (``--quick`` for a smoke run).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import wrkutil  # noqa: E402

MESSAGES = 50
MAILDEV_LIST, MAILDEV_ONE = "MailDev 2.2.1 GET /email", "MailDev 2.2.1 GET /email/{id}"
ENDPOINTS = {"inbox": "TempMail /api.php/inbox/{email}", "email": "TempMail /api.php/email/{id}",
             "messages": "TempMail /api/messages?email="}


def fill_tempmail(box: common.Sandbox) -> dict:
    """``make run`` in the sandbox; an api.php mailbox and a User API mailbox
    of 50 messages each (delivered through its own mail daemon, then idle);
    returns the URLs to load, the message id taken from the inbox JSON
    (api.php ids are a keyed permutation)."""
    box.init_db()
    legacy = box.mailboxes(["reader"])[0]
    key = box.api_key()
    run = box.start_make_run()
    base = f"http://127.0.0.1:{box.http_port}"
    req = urllib.request.Request(f"{base}/api/emails", method="POST",
                                 headers={"Authorization": f"Bearer {key}"})
    owned = json.load(urllib.request.urlopen(req, timeout=30))["data"]["email"]
    common.send_messages(box.smtp_port, legacy, MESSAGES)
    common.send_messages(box.smtp_port, owned, MESSAGES)
    inbox = json.load(urllib.request.urlopen(f"{base}/api.php/inbox/{legacy}", timeout=30))
    first_id = inbox["emails"][0]["id"]
    workers = common.child_pids(box.pids(run, "gunicorn")[0])
    return {
        ENDPOINTS["inbox"]: (f"{base}/api.php/inbox/{legacy}", {}, workers),
        ENDPOINTS["email"]: (f"{base}/api.php/email/{first_id}", {}, workers),
        ENDPOINTS["messages"]: (f"{base}/api/messages?email={owned}", {"Authorization": f"Bearer {key}"}, workers),
    }


def fill_maildev(box: common.Sandbox) -> dict:
    """MailDev holding the same 50 messages: its listing and one message."""
    server, web = common.start_maildev(box)
    common.send_messages(server.port, f"reader@{common.DOMAIN}", MESSAGES)
    base = f"http://127.0.0.1:{web}"
    first = json.load(urllib.request.urlopen(f"{base}/email", timeout=30))[0]["id"]
    return {MAILDEV_LIST: (f"{base}/email", {}, []), MAILDEV_ONE: (f"{base}/email/{first}", {}, [])}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/PID/stat``), 0 if gone.
    The split between gunicorn's workers shows whether one of them took all
    of wrk's connections while the other idled."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:KEY=VALUE,KEY=VALUE`` -> (NAME, environment additions)."""
    name, _, pairs = text.partition(":")
    return name, dict(p.split("=", 1) for p in pairs.split(",") if p)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="HTTP API benchmark with wrk, TempMail vs MailDev.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8, help="wrk duration per run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--endpoints", default="inbox,email,messages")
    parser.add_argument("--no-maildev", action="store_true")
    parser.add_argument("--compare", help="another checkout whose make run is loaded alternately (A/B)")
    parser.add_argument("--variant", action="append", default=[],
                        help="NAME:ENV=VALUE,...: one more make run of this tree with these environment "
                             "variables (e.g. 'workers4:TEMPMAIL_WORKERS=4', "
                             "'reuseport:GUNICORN_CMD_ARGS=--reuse-port'); repeatable")
    parser.add_argument("--json", help="write the medians to this file (run_all.py reads it)")
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 3
    wanted = [ENDPOINTS[e] for e in args.endpoints.split(",") if e]
    print(f"HTTP APIs under wrk  ({common.machine_line()})")
    print(f"TempMail as make run serves it ({' '.join(common.make_run_gunicorn(8000)[1:])}); "
          f"wrk -t2 -c{args.connections} -d{args.seconds:g}s; {args.rounds} rounds; "
          f"{MESSAGES} messages per mailbox")
    results: dict[str, list] = {}
    load_start = os.getloadavg()[0]
    with contextlib.ExitStack() as stack:
        targets = {k: v for k, v in fill_tempmail(stack.enter_context(common.Sandbox("http"))).items()
                   if k in wanted}
        others = ([(Path(args.compare).name, Path(args.compare), {})] if args.compare else []) + \
                 [(name, common.ROOT, env) for name, env in map(parse_variant, args.variant)]
        for label, code, env in others:
            box = stack.enter_context(common.Sandbox("http", code=code, extra_env=env))
            targets.update({f"{k} @{label}": v for k, v in fill_tempmail(box).items() if k in wanted})
        if not args.no_maildev:
            targets.update(fill_maildev(stack.enter_context(common.Sandbox("http-maildev"))))
        for name, (url, headers, _pids) in targets.items():  # warm-up: imports, caches, MailDev's JIT
            wrkutil.run(url, 2, args.connections, headers=headers)
        for rnd in range(args.rounds):
            for name, (url, headers, pids) in targets.items():
                common.settle()  # the previous server's backlog drained first
                before = [cpu_seconds(p) for p in pids]
                res = wrkutil.run(url, args.seconds, args.connections, headers=headers)
                used = [cpu_seconds(p) - b for p, b in zip(pids, before)]
                res.split = "/".join(f"{100 * u / sum(used):.0f}" for u in used) if sum(used) else "-"
                results.setdefault(name, []).append(res)
                common.log(f"  [round {rnd + 1}] {name}: {res.rps:,.0f} req/s p50 {res.p50_ms:.1f} ms "
                           f"p99 {res.p99_ms:.1f} ms errors {res.errors}, workers' CPU split % {res.split}")
    summary = report(results)
    print(f"load average at the start {load_start:.2f}, at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"load_start": load_start, "medians": summary}, indent=1))
    return summary


def report(results: dict[str, list]) -> dict:
    """Median requests/s and latency per endpoint, and the ratio to MailDev."""
    summary = {name: {"rps": common.median([r.rps for r in runs]),
                      "p50": common.median([r.p50_ms for r in runs]),
                      "p99": common.median([r.p99_ms for r in runs]),
                      "errors": sum(r.errors for r in runs)} for name, runs in results.items()}
    maildev = summary.get(MAILDEV_LIST, {}).get("rps", float("nan"))
    rows = [[name, f"{s['rps']:,.0f}", f"{s['p50']:.1f}", f"{s['p99']:.1f}", s["errors"],
             " ".join(f"{r.rps:.0f}" for r in results[name]), common.ratio(s["rps"], maildev),
             " ".join(getattr(r, "split", "-") for r in results[name])]
            for name, s in summary.items()]
    print(common.table(rows, ["endpoint", "median req/s", "p50 ms", "p99 ms", "errors",
                              "rounds req/s", "vs MailDev GET /email", "workers' CPU split %"]))
    return summary


if __name__ == "__main__":
    main()
