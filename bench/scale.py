"""Benchmark 4: scale. A database of 1,000,000 messages in 100,000 mailboxes,
generated directly with bulk SQL inserts into the app's own schema, then:

* the inbox listing of a 500-message mailbox: server time (the Flask app
  in-process, no network) and over HTTP to gunicorn, p50/p99;
* a purge of the expired mailboxes (20% of them, 200,000 messages with their
  raw files) by ``flask purge`` while SMTP ingest goes on: ingest latency
  (connect to 250) p50/p99 before and during the purge, and the purge rate.

Run: ``.venv/bin/python bench/scale.py`` (``--messages 100000`` or ``--quick``
for a smaller database; mailboxes are always messages / 10).
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import smtplib
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

BIG = "bigbox"       # the mailbox holding 500 messages
LIVE = "livebox"     # where the ingest during the purge delivers
PER_BOX = 10


def ts(moment: datetime) -> str:
    """SQLAlchemy's SQLite DateTime text format."""
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


def message_row(msg_id: int, box_id: int, received: str, raw_path: str | None) -> tuple:
    """One messages row: the fields of a typical small notification mail."""
    return (msg_id, f"{msg_id:012x}{secrets.token_hex(17)}", box_id, "sender@source.test",
            f"user{box_id}@{common.DOMAIN}", "sender@source.test", "Sender",
            f"user{box_id}@{common.DOMAIN}", "", f"Your code is {msg_id % 1000000:06d}",
            None, f"<{msg_id}@source.test>", f"Hello, your code is {msg_id % 1000000:06d}.\n",
            f"<p>Hello, your code is <b>{msg_id % 1000000:06d}</b>.</p>", 0, 2048, received,
            raw_path, None)


MESSAGE_COLUMNS = ("id, public_id, mailbox_id, envelope_from, envelope_to, from_email, from_name, "
                   '"to", cc, subject, date, message_id, body_text, body_html, is_read, size, '
                   "received_at, raw_path, raw_sha256")


def generate(box: common.Sandbox, messages: int, raw_files: bool) -> dict:
    """Fill the database: mailbox 1 (BIG) gets 500 messages, the others
    PER_BOX each; the first 20% of the other mailboxes are expired, and each
    of their messages gets a raw file for the purge to unlink."""
    boxes = max(2, messages // PER_BOX)
    expired_boxes = (boxes - 1) // 5
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    live_until, dead_since = ts(now + timedelta(days=1)), ts(now - timedelta(hours=1))
    created, received = ts(now - timedelta(hours=2)), ts(now - timedelta(hours=1, minutes=30))
    conn = box.db()
    domain_id = conn.execute("SELECT id FROM domains WHERE name = ?", (common.DOMAIN,)).fetchone()[0]
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO mailboxes (id, address, username, domain_id, created_at, expires_at, token) "
        "VALUES (?,?,?,?,?,?,?)",
        ((i, f"{name}@{common.DOMAIN}", name, domain_id, created,
          dead_since if 2 <= i < 2 + expired_boxes else live_until, secrets.token_hex(8))
         for i, name in ((i, BIG if i == 1 else f"user{i}") for i in range(1, boxes + 1))))
    raw_dir = box.uploads / "bench"
    raw_dir.mkdir(exist_ok=True)
    raw = b"From: sender@source.test\r\nSubject: code\r\n\r\n" + b"x" * 2000 + b"\r\n"

    def rows():
        msg_id = 0
        for box_id in range(1, boxes + 1):
            expired = 2 <= box_id < 2 + expired_boxes
            for _ in range(500 if box_id == 1 else PER_BOX):
                msg_id += 1
                path = None
                if expired and raw_files:
                    path = f"bench/{msg_id}.eml"
                    (box.uploads / path).write_bytes(raw)
                yield message_row(msg_id, box_id, received, path)
    conn.executemany(f"INSERT INTO messages ({MESSAGE_COLUMNS}) VALUES ({','.join('?' * 19)})", rows())
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    total = conn.execute("SELECT count(*) FROM messages").fetchone()[0]
    conn.close()
    return {"mailboxes": boxes, "messages": total, "expired_messages": expired_boxes * PER_BOX}


SERVER_TIME = """
import json, sys, time
from app import create_app
app = create_app()
client = app.test_client()
url = sys.argv[1]
for _ in range(5):
    client.get(url)
times = []
for _ in range(int(sys.argv[2])):
    start = time.perf_counter()
    resp = client.get(url)
    times.append((time.perf_counter() - start) * 1000)
    assert resp.status_code == 200 and resp.get_json()["total"] == 500, resp.data[:200]
print(json.dumps(times))
"""


def listing_times(box: common.Sandbox, web_port: int, count: int = 100) -> tuple[list, list]:
    """Inbox listing of the 500-message mailbox: in-process server time, and HTTP."""
    import http.client
    url = f"/api.php/inbox/{BIG}@{common.DOMAIN}"
    res = subprocess.run([str(common.PYTHON), "-c", SERVER_TIME, url, str(count)], env=box.env(),
                         cwd=common.ROOT, capture_output=True, text=True, check=True)
    server = json.loads(res.stdout.strip().splitlines()[-1])
    conn, http_ms = http.client.HTTPConnection("127.0.0.1", web_port, timeout=30), []
    for _ in range(count):
        start = time.perf_counter()
        conn.request("GET", url)
        conn.getresponse().read()
        http_ms.append((time.perf_counter() - start) * 1000)
    conn.close()
    return server, http_ms


def ingest_worker(port: int, stop: threading.Event, out: list, phase: list) -> None:
    """Send 2 KB messages, a new connection each, recording (phase, ms to 250)."""
    rcpt = f"{LIVE}@{common.DOMAIN}"
    data = common.sample_message(rcpt, 1).as_bytes() + b"x" * 1200
    while not stop.is_set():
        start = time.monotonic()
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
                smtp.sendmail("sender@source.test", [rcpt], data)
            out.append((phase[0], (time.monotonic() - start) * 1000))
        except (smtplib.SMTPException, OSError) as exc:
            out.append((phase[0] + "-error", str(exc)))


def purge_under_ingest(box: common.Sandbox, smtp_port: int, baseline_s: float, clients: int) -> dict:
    """Ingest for ``baseline_s`` alone, then run ``flask purge`` while ingest goes on."""
    stop, samples, phase = threading.Event(), [], ["baseline"]
    workers = [threading.Thread(target=ingest_worker, args=(smtp_port, stop, samples, phase), daemon=True)
               for _ in range(clients)]
    for w in workers:
        w.start()
    time.sleep(baseline_s)
    phase[0] = "purge"
    start = time.monotonic()
    out = box.flask("purge", "--no-orphans", timeout=1800)
    purge_s = time.monotonic() - start
    phase[0] = "after"
    stop.set()
    for w in workers:
        w.join(70)
    return {"purge_s": purge_s, "purge_output": out.strip(), "samples": samples}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="Scale: 1M messages, listing and purge under ingest.")
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--clients", type=int, default=4, help="concurrent SMTP senders during the purge")
    parser.add_argument("--baseline", type=float, default=8, help="seconds of ingest before the purge")
    parser.add_argument("--no-raw-files", action="store_true", help="expired messages without raw files")
    parser.add_argument("--quick", action="store_true", help="100,000 messages")
    args = parser.parse_args(argv)
    if args.quick:
        args.messages = 100_000
    print(f"Scale  ({common.machine_line()})")
    # The daemon's own purge timer is off: the purge measured is flask purge's.
    smtp = {"host": "127.0.0.1", "port": 0, "purge_interval": 0}
    with common.Sandbox("scale", smtp=smtp) as box:
        box.config["smtp"]["port"] = box.smtp_port
        box.config_path.write_text(json.dumps(box.config))
        box.init_db()
        start = time.monotonic()
        made = generate(box, args.messages, not args.no_raw_files)
        gen_s = time.monotonic() - start
        box.mailboxes([LIVE])
        size_mb = os.path.getsize(box.db_path) / 2**20
        print(f"generated {made['messages']:,} messages in {made['mailboxes']:,} mailboxes "
              f"({made['expired_messages']:,} expired) in {gen_s:.0f} s; database {size_mb:,.0f} MiB")
        web, smtpd = box.start_gunicorn(access_log=False), box.start_smtpd()
        server_ms, http_ms = listing_times(box, web.port)
        web.stop()
        box.servers.remove(web)
        result = purge_under_ingest(box, smtpd.port, args.baseline, args.clients)
        left = box.count("messages", "WHERE mailbox_id IN (SELECT id FROM mailboxes WHERE expires_at < ?)",
                         (ts(datetime.now(timezone.utc).replace(tzinfo=None)),))
    return report(made, server_ms, http_ms, result, left)


def report(made: dict, server_ms: list, http_ms: list, result: dict, left: int) -> dict:
    def lat(phase):
        values = [ms for p, ms in result["samples"] if p == phase]
        return values, common.percentile(values, 50), common.percentile(values, 99)
    rows = [["inbox of 500 messages, server time (in-process)", len(server_ms),
             f"{common.percentile(server_ms, 50):.1f}", f"{common.percentile(server_ms, 99):.1f}"],
            ["inbox of 500 messages, HTTP to gunicorn", len(http_ms),
             f"{common.percentile(http_ms, 50):.1f}", f"{common.percentile(http_ms, 99):.1f}"]]
    for phase in ("baseline", "purge"):
        values, p50, p99 = lat(phase)
        rows.append([f"SMTP ingest connect -> 250, {phase}", len(values), f"{p50:.1f}", f"{p99:.1f}"])
    print(common.table(rows, ["measure", "samples", "p50 ms", "p99 ms"]))
    errors = [s for s in result["samples"] if s[0].endswith("-error")]
    rate = made["expired_messages"] / result["purge_s"]
    print(f"flask purge: {result['purge_output'].splitlines()[0] if result['purge_output'] else ''} "
          f"in {result['purge_s']:.1f} s = {rate:,.0f} messages/s; expired messages left: {left}; "
          f"SMTP errors during the run: {len(errors)}")
    _v, _p50, purge_p99 = lat("purge")
    print(f"Targets: listing server time < 10 ms: p99 {common.percentile(server_ms, 99):.1f} ms; "
          f"ingest p99 during purge < 200 ms: {purge_p99:.1f} ms")
    return {"listing_p99": common.percentile(server_ms, 99), "purge_rate": rate, "ingest_p99": purge_p99}


if __name__ == "__main__":
    main()
