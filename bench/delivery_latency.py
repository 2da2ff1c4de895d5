"""Benchmark 2: delivery latency, from the 250 reply to the message being
visible in ``GET /api.php/inbox/{email}``, under the ingest load of bench 1.

While ``smtp-source -s 8 -l 2048`` (new connection per message) keeps the
mail daemon busy, a probe sends one message at a time to its own mailbox,
notes when the 250 after DATA arrives, then polls the inbox (``limit=1``,
``offset`` = the probe's position, over one keep-alive connection to
gunicorn) until that message shows up. Printed: p50/p99 of that visibility
delay, and of the probe's whole SMTP transaction (connect to 250).

Since TempMail answers 250 only after the commit, the visibility delay is
essentially one HTTP round trip; a delay well above that would mean a 250
before the message was stored.

Run: ``.venv/bin/python bench/delivery_latency.py`` (``--quick``: 50 probes).
"""
from __future__ import annotations

import argparse
import http.client
import json
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROBE = "probe"
LOAD = "ingest"


def background_load(port: int, stop: threading.Event, counter: list) -> None:
    """smtp-source runs of 1000 messages back to back until ``stop`` is set."""
    binary, env = common.postfix_tool("smtp-source")
    cmd = [binary, "-s", "8", "-m", "1000", "-l", "2048", "-f", "sender@source.test",
           "-t", f"{LOAD}@{common.DOMAIN}", f"127.0.0.1:{port}"]
    while not stop.is_set():
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None:
            if stop.wait(0.05):
                proc.kill()
        proc.wait()
        counter[0] += 1


def wait_visible(conn: http.client.HTTPConnection, address: str, position: int, subject: str,
                 timeout: float = 30) -> float:
    """Poll the inbox until message number ``position`` (0-based) has ``subject``;
    returns the monotonic time it was first seen."""
    deadline = time.monotonic() + timeout
    path = f"/api.php/inbox/{address}?limit=1&offset={position}"
    while time.monotonic() < deadline:
        conn.request("GET", path)
        body = json.loads(conn.getresponse().read())
        emails = body.get("emails") or []
        if emails and emails[0]["subject"] == subject:
            return time.monotonic()
    raise RuntimeError(f"probe {position} not visible after {timeout}s")


def probe(smtp_port: int, web_port: int, address: str, count: int, time_limit: float):
    """Send ``count`` probes (or as many as fit in ``time_limit``); returns the
    lists of visibility delays and SMTP transaction times in ms."""
    visible, smtp_ms = [], []
    conn = http.client.HTTPConnection("127.0.0.1", web_port, timeout=30)
    stop_at = time.monotonic() + time_limit
    for n in range(count):
        if time.monotonic() > stop_at:
            break
        subject = f"probe {n} {time.time_ns()}"
        data = common.sample_message(address, n, subject=subject).as_bytes()
        start = time.monotonic()
        with smtplib.SMTP("127.0.0.1", smtp_port, timeout=60) as smtp:
            smtp.sendmail("probe@source.test", [address], data)  # returns on the 250 after DATA
            got_250 = time.monotonic()
        seen = wait_visible(conn, address, n, subject)
        visible.append((seen - got_250) * 1000)
        smtp_ms.append((got_250 - start) * 1000)
    conn.close()
    return visible, smtp_ms


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Delivery latency 250 -> visible, under load.")
    parser.add_argument("--probes", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=60, help="stop probing after this long")
    parser.add_argument("--no-load", action="store_true", help="probe an idle daemon")
    parser.add_argument("--quick", action="store_true", help="50 probes")
    args = parser.parse_args(argv)
    if args.quick:
        args.probes, args.seconds = 50, 20
    print(f"Delivery latency  ({common.machine_line()})")
    with common.Sandbox("latency") as box:
        box.init_db()
        address = box.mailboxes([PROBE, LOAD])[0]
        smtpd, web = box.start_smtpd(), box.start_gunicorn()
        stop, runs = threading.Event(), [0]
        loader = threading.Thread(target=background_load, args=(smtpd.port, stop, runs), daemon=True)
        loaded_before = box.count("messages")
        started = time.monotonic()
        if not args.no_load:
            loader.start()
            time.sleep(1)  # let the load reach its steady state
        try:
            visible, smtp_ms = probe(smtpd.port, web.port, address, args.probes, args.seconds)
        finally:
            stop.set()
            if loader.is_alive():
                loader.join(10)
        elapsed = time.monotonic() - started
        load_rate = (box.count("messages") - loaded_before - len(visible)) / elapsed
    load = "none" if args.no_load else f"smtp-source -s 8 -l 2048 new connections, {load_rate:,.0f} msg/s stored"
    print(f"{len(visible)} probes; background load: {load}")
    rows = [["250 -> visible in /api.php/inbox", f"{common.percentile(visible, 50):.1f}",
             f"{common.percentile(visible, 99):.1f}", f"{max(visible):.1f}"],
            ["probe SMTP transaction (connect -> 250)", f"{common.percentile(smtp_ms, 50):.1f}",
             f"{common.percentile(smtp_ms, 99):.1f}", f"{max(smtp_ms):.1f}"]]
    print(common.table(rows, ["delay", "p50 ms", "p99 ms", "max ms"]))
    p99 = common.percentile(visible, 99)
    print(f"Target: p99 250 -> visible < 50 ms: {p99:.1f} ms")
    return {"p50": common.percentile(visible, 50), "p99": p99, "smtp_p99": common.percentile(smtp_ms, 99),
            "load_rate": load_rate}


if __name__ == "__main__":
    main()
