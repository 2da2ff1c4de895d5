"""Benchmark 5: memory.

* Peak RSS (VmHWM) of the mail daemon while it receives one 25 MiB message
  whose attachment part is 24 MiB on the wire, next to stock Salmon with the
  same message. The peak is reset (``clear_refs``) after start-up, so it is
  the message's own cost; with several receiver processes the largest peak
  among them is reported. ``--attachment-mib 24 --decoded`` sends a 24 MiB
  file instead (a ~33 MiB message; the limit is raised to let it in).
* RSS of each gunicorn worker (``make run``'s, deploy/run.sh) after a
  warm-up and again after 10,000 API requests over the three API routes.

Run: ``.venv/bin/python bench/memory.py`` (``--requests 2000`` for a short run).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import smtplib
import sys
import threading
import time
import urllib.request
from email.message import EmailMessage
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

MIB = 2**20


def big_message(rcpt: str, attachment_mib: float, decoded: bool) -> bytes:
    """A message with one large binary attachment: ``attachment_mib`` is its
    size on the wire (base64), or decoded when ``decoded``."""
    raw_size = int(attachment_mib * MIB * (1 if decoded else 0.75))
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "big@source.test", rcpt, "A big attachment"
    msg.set_content("The file is attached.\n")
    msg.add_attachment(os.urandom(raw_size), maintype="application", subtype="zip",
                       filename="archive.zip")
    return msg.as_bytes()


def peak_while_receiving(server: common.Server, port: int, rcpt: str, data: bytes) -> dict:
    """Send ``data`` once; the largest VmHWM in the server's process tree."""
    pids = common.tree_pids(server.pid)
    idle = max(common.proc_kib(p, "VmRSS") for p in pids)
    for pid in pids:
        common.reset_peak_rss(pid)
    start = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=300) as smtp:
        smtp.sendmail("big@source.test", [rcpt], data)
    elapsed = time.monotonic() - start
    time.sleep(0.5)
    peak = max(common.proc_kib(p, "VmHWM") for p in pids)
    return {"idle_mib": idle / 1024, "peak_mib": peak / 1024, "seconds": elapsed}


def daemon_memory(attachment_mib: float, decoded: bool) -> dict:
    limit = 26214400 if not decoded else int(attachment_mib * MIB * 1.4) + MIB
    results = {}
    with common.Sandbox("memory", max_message_bytes=limit) as box:
        box.init_db()
        rcpt = box.mailboxes(["bigfile"])[0]
        data = big_message(rcpt, attachment_mib, decoded)
        common.log(f"message of {len(data) / MIB:.1f} MiB")
        smtpd = box.start_smtpd()
        time.sleep(1)
        results["TempMail flask smtpd"] = peak_while_receiving(smtpd, smtpd.port, rcpt, data)
        stored = box.count("attachments")
        salmon, _db = common.start_stock_salmon(box)
        time.sleep(1)
        results["stock Salmon 3.3.0"] = peak_while_receiving(salmon, salmon.port, rcpt, data)
    results["_size_mib"] = len(data) / MIB
    results["_stored_attachments"] = stored
    return results


def api_load(port: int, paths: list[tuple[str, dict]], total: int, threads: int = 8) -> int:
    """``total`` GETs spread over ``paths`` by ``threads`` keep-alive clients;
    returns how many did not answer 200."""
    failures, per_thread = [0], total // threads

    def client(offset: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        for n in range(per_thread):
            path, headers = paths[(n + offset) % len(paths)]
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
            resp.read()
            if resp.status != 200:
                failures[0] += 1
        conn.close()
    pool = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return failures[0]


def worker_memory(requests: int) -> dict:
    with common.Sandbox("memory-web") as box:
        box.init_db()
        legacy = box.mailboxes(["reader"])[0]
        key = box.api_key()
        auth = {"Authorization": f"Bearer {key}"}
        run = box.start_make_run()
        port = box.http_port
        req = urllib.request.Request(f"http://127.0.0.1:{port}/api/emails", method="POST", headers=auth)
        owned = json.load(urllib.request.urlopen(req, timeout=30))["data"]["email"]
        common.send_messages(box.smtp_port, legacy, 50)
        common.send_messages(box.smtp_port, owned, 50)
        inbox = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api.php/inbox/{legacy}"))
        paths = [(f"/api.php/inbox/{legacy}", {}), (f"/api.php/email/{inbox['emails'][0]['id']}", {}),
                 (f"/api/messages?email={owned}", auth)]
        workers = common.child_pids(box.pids(run, "gunicorn")[0])
        api_load(port, paths, 1000)  # warm-up: imports, caches, pools
        before = {pid: common.proc_kib(pid, "VmRSS") for pid in workers}
        failures = api_load(port, paths, requests)
        after = {pid: common.proc_kib(pid, "VmRSS") for pid in workers}
    return {"before": before, "after": after, "failures": failures}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Peak RSS of the mail daemon and gunicorn workers.")
    parser.add_argument("--attachment-mib", type=float, default=24)
    parser.add_argument("--decoded", action="store_true", help="attachment size decoded, not on the wire")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="2,000 API requests")
    parser.add_argument("--json", help="write the figures to this file (run_all.py reads it)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests = 2000
    print(f"Memory  ({common.machine_line()})")
    daemon = daemon_memory(args.attachment_mib, args.decoded)
    kind = "decoded" if args.decoded else "on the wire"
    print(f"one {daemon['_size_mib']:.1f} MiB message, attachment {args.attachment_mib:g} MiB {kind} "
          f"(TempMail stored {daemon['_stored_attachments']} attachment)")
    rows = [[name, f"{r['idle_mib']:.0f}", f"{r['peak_mib']:.0f}", f"{r['seconds']:.2f}"]
            for name, r in daemon.items() if not name.startswith("_")]
    print(common.table(rows, ["daemon", "RSS idle MiB", "peak RSS MiB", "send s"]))
    web = worker_memory(args.requests)
    rows, growth = [], []
    for pid, before in web["before"].items():
        after = web["after"].get(pid, 0)
        growth.append((after - before) / before * 100 if before else float("nan"))
        rows.append([pid, f"{before / 1024:.1f}", f"{after / 1024:.1f}", f"{growth[-1]:+.1f}%"])
    print(f"gunicorn workers, {args.requests:,} API requests after a 1,000-request warm-up "
          f"({web['failures']} non-200):")
    print(common.table(rows, ["worker pid", "RSS before MiB", "RSS after MiB", "growth"]))
    peak = daemon["TempMail flask smtpd"]["peak_mib"]
    print(f"Targets: daemon peak < 200 MiB: {peak:.0f} MiB; worker growth <= 10%: "
          f"{max(growth):+.1f}% (largest)")
    out = {"daemon_peak_mib": peak, "salmon_peak_mib": daemon["stock Salmon 3.3.0"]["peak_mib"],
           "worker_growth_pct": max(growth)}
    if args.json:
        Path(args.json).write_text(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
