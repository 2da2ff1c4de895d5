"""Benchmark 3: the HTTP APIs under wrk, side by side with MailDev's REST API.

The web app runs as ``make run`` serves it (gunicorn ``wsgi:application``,
2 workers x 4 threads, access log on); wrk opens 50 connections. Endpoints,
alternating round after round so noise hits all of them alike:

* ``GET /api.php/inbox/{email}``   a mailbox holding 50 messages;
* ``GET /api.php/email/{id}``      one message with its attachment list;
* ``GET /api/messages?email=``     the User API listing (Bearer key, quota
  counted on every answer: a database write per request);
* MailDev 2.2.1 ``GET /email``     its listing of the same 50 messages.

Run: ``.venv/bin/python bench/http_api.py`` (``--quick`` for a smoke run).
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import wrkutil  # noqa: E402

MESSAGES = 50
ENDPOINTS = {"inbox": "TempMail /api.php/inbox/{email}", "email": "TempMail /api.php/email/{id}",
             "messages": "TempMail /api/messages?email="}


def fill_tempmail(box: common.Sandbox) -> dict:
    """Mailboxes with 50 messages each (through the real SMTP daemon, stopped
    afterwards so it does not compete for the CPU); returns the URLs to load."""
    box.init_db()
    legacy = box.mailboxes(["reader"])[0]
    key = box.api_key()
    web = box.start_gunicorn()
    base = f"http://127.0.0.1:{web.port}"
    req = urllib.request.Request(f"{base}/api/emails", method="POST",
                                 headers={"Authorization": f"Bearer {key}"})
    owned = json.load(urllib.request.urlopen(req, timeout=30))["data"]["email"]
    smtpd = box.start_smtpd()
    common.send_messages(smtpd.port, legacy, MESSAGES)
    common.send_messages(smtpd.port, owned, MESSAGES)
    smtpd.stop()
    box.servers.remove(smtpd)
    inbox = json.load(urllib.request.urlopen(f"{base}/api.php/inbox/{legacy}", timeout=30))
    first_id = inbox["emails"][0]["id"]
    return {
        "TempMail /api.php/inbox/{email}": (f"{base}/api.php/inbox/{legacy}", {}),
        "TempMail /api.php/email/{id}": (f"{base}/api.php/email/{first_id}", {}),
        "TempMail /api/messages?email=": (f"{base}/api/messages?email={owned}",
                                          {"Authorization": f"Bearer {key}"}),
    }


def fill_maildev(box: common.Sandbox) -> tuple[str, dict]:
    server, web = common.start_maildev(box)
    common.send_messages(server.port, f"reader@{common.DOMAIN}", MESSAGES)
    return "MailDev 2.2.1 /email", (f"http://127.0.0.1:{web}/email", {})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="HTTP API benchmark with wrk, TempMail vs MailDev.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8, help="wrk duration per run")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--no-maildev", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1 round of 3 s runs")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 3
    print(f"HTTP APIs under wrk  ({common.machine_line()})")
    print(f"gunicorn --workers 2 --threads 4 (as make run); wrk -t2 -c{args.connections} "
          f"-d{args.seconds:g}s; {args.rounds} rounds; {MESSAGES} messages per mailbox")
    results: dict[str, list] = {}
    with common.Sandbox("http") as box:
        targets = fill_tempmail(box)
        if not args.no_maildev:
            name, target = fill_maildev(box)
            targets[name] = target
        for rnd in range(args.rounds):
            for name, (url, headers) in targets.items():
                res = wrkutil.run(url, args.seconds, args.connections, headers=headers)
                results.setdefault(name, []).append(res)
                common.log(f"  [round {rnd + 1}] {name}: {res.rps:,.0f} req/s p50 {res.p50_ms:.1f} ms "
                           f"p99 {res.p99_ms:.1f} ms errors {res.errors}")
    summary = report(results)
    inbox = summary["TempMail /api.php/inbox/{email}"]
    maildev = summary.get("MailDev 2.2.1 /email", {}).get("rps", float("nan"))
    print(f"Targets (inbox): >= 1,500 req/s: {inbox['rps']:,.0f}; p99 < 50 ms: {inbox['p99']:.1f} ms; "
          f"more than MailDev /email: {common.ratio(inbox['rps'], maildev)}")
    return summary


def report(results: dict[str, list]) -> dict:
    """Median requests/s and latency per endpoint, and the ratio to MailDev."""
    summary = {name: {"rps": common.median([r.rps for r in runs]),
                      "p50": common.median([r.p50_ms for r in runs]),
                      "p99": common.median([r.p99_ms for r in runs]),
                      "errors": sum(r.errors for r in runs)} for name, runs in results.items()}
    maildev = summary.get("MailDev 2.2.1 /email", {}).get("rps", float("nan"))
    rows = [[name, f"{s['rps']:,.0f}", f"{s['p50']:.1f}", f"{s['p99']:.1f}", s["errors"],
             " ".join(f"{r.rps:.0f}" for r in results[name]), common.ratio(s["rps"], maildev)]
            for name, s in summary.items()]
    print(common.table(rows, ["endpoint", "median req/s", "p50 ms", "p99 ms", "errors",
                              "rounds req/s", "vs MailDev"]))
    return summary


if __name__ == "__main__":
    main()
