"""Capacity: do held requests starve ordinary ones?

``make run``'s deployment (the gunicorn line of deploy/run.sh: ``--config
deploy/gunicorn.conf.py``, one gevent worker per core; the mail daemon beside it; SQLite) serves ordinary API
requests with wrk, first with nothing held, then while N connections are
held open (default 1,000: half ``GET /api.php/inbox/{email}?wait=30`` long
polls, re-sent as each one ends, half ``GET /api/messages/stream`` Server-
Sent Events streams). Rounds alternate (none, held, none, held, ...) so the
machine's own drift hits both sides; the figure is the median of each
side and their ratio. Each line carries the load average, because the
machine is shared.

At the end, while everything is still held, one message goes to a
long-polled mailbox and one to a streamed mailbox: the time from the 250
to the answer shows the held clients are still served.

    .venv/bin/python bench/capacity.py [--held 1000] [--rounds 3] [--seconds 8] [--connections N] [--quick]
"""
from __future__ import annotations

import argparse
import asyncio
import email.utils
import json
import os
import resource
import smtplib
import threading
import time
from collections import Counter
from email.message import EmailMessage
from urllib.request import Request, urlopen

import common
import wrkutil
from common import log

BOXES = 50  # mailboxes per kind of held request; held requests share them
POLL_WAIT = 30  # seconds each long poll asks to wait
# After the client hangs up, the server holds a long poll until its wait ends
# and a stream until its next heartbeat (15 s): the "none" rounds start only
# once the last round's held requests are gone on the server too.
DRAIN = POLL_WAIT + 5


# --------------------------------------------------------------------------
# the held connections (asyncio, in a thread of this process)

class Held:
    """N raw HTTP connections kept busy with long polls and streams."""

    def __init__(self, port: int, polls: list[str], streams: list[str], key: str):
        self.port, self.polls, self.streams, self.key = port, polls, streams, key
        self.open_polls = self.open_streams = self.answers = 0
        self.failures: Counter = Counter()  # what went wrong, by kind
        self.events: list[tuple[str, float]] = []  # (what, when) of stream events and poll answers
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def start(self, count: int) -> None:
        """Open ``count`` held connections, half polls, half streams."""
        for n in range(count):
            if n % 2 == 0:
                box = self.polls[n // 2 % len(self.polls)]
                asyncio.run_coroutine_threadsafe(self.poll(box), self.loop)
            else:
                box = self.streams[n // 2 % len(self.streams)]
                asyncio.run_coroutine_threadsafe(self.stream(box), self.loop)

    def close(self) -> None:
        """Hang up every held connection (and forget their tasks)."""
        asyncio.run_coroutine_threadsafe(self._close(), self.loop).result(60)

    async def _close(self) -> None:
        """Cancel every held connection's task: each closes its socket."""
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def poll(self, box: str) -> None:
        """A long poll re-sent on the same connection as each one ends,
        until cancelled."""
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
            self.open_polls += 1
            since = ""
            while True:
                writer.write(f"GET /api.php/inbox/{box}?wait={POLL_WAIT}&since={since} HTTP/1.1\r\n"
                             "Host: bench\r\n\r\n".encode())
                await writer.drain()
                status, body = await read_response(reader)
                self.answers += 1
                if status != 200:
                    self.failures[f"poll {status}"] += 1
                    await asyncio.sleep(1)
                elif json.loads(body)["total"]:
                    self.events.append((box, time.perf_counter()))
                    since = json.loads(body)["emails"][-1]["id"]  # wait for newer mail next
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self.failures[f"poll {type(exc).__name__}"] += 1
        finally:
            if writer is not None:
                self.open_polls -= 1
                writer.close()

    async def stream(self, box: str) -> None:
        """A stream read until cancelled; message events are timed."""
        writer, opened = None, False
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
            writer.write((f"GET /api/messages/stream?email={box} HTTP/1.1\r\nHost: bench\r\n"
                          f"Authorization: Bearer {self.key}\r\n\r\n").encode())
            await writer.drain()
            status = int((await reader.readline()).split()[1])
            if status != 200:
                self.failures[f"stream {status}"] += 1
                return
            opened = True
            self.open_streams += 1
            while line := await reader.readline():
                if line.startswith(b"event: message"):
                    self.events.append((box, time.perf_counter()))
            self.failures["stream ended by the server"] += 1
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            self.failures[f"stream {type(exc).__name__}"] += 1
        finally:
            self.open_streams -= opened
            if writer is not None:
                writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length body (what api.php sends)."""
    status = int((await reader.readline()).split()[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        if name.lower() == "content-length":
            length = int(value)
    return status, await reader.readexactly(length)


# --------------------------------------------------------------------------
# set-up and measuring

def raise_fd_limit() -> None:
    """A thousand sockets here and in each worker: lift the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start(box: common.Sandbox, connections: int | None) -> int:
    """The daemon and gunicorn exactly as ``make run`` starts them (the
    gunicorn line read from deploy/run.sh); ``connections`` overrides the
    config's connections per worker, for comparison. Returns the web port."""
    box.init_db()
    box.start_smtpd()
    port = common.free_port()
    env = box.env()
    if connections:
        env["TEMPMAIL_CONNECTIONS"] = str(connections)
    box.start("gunicorn", common.make_run_gunicorn(port), port, env=env)
    return port


def http_json(url: str, method: str = "GET", key: str | None = None) -> dict:
    req = Request(url, method=method, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def send(port: int, to: str, subject: str) -> float:
    """One message; the moment its 250 arrived."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "bench <b@source.test>", to, subject
    # Distinct bytes every time: the daemon stores a resent identical message once.
    msg["Message-ID"] = email.utils.make_msgid(domain="source.test")
    msg.set_content("capacity probe\n")
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as conn:
        conn.sendmail("b@source.test", [to], msg.as_bytes())
        return time.perf_counter()


def measure(base: str, key: str, box_legacy: str, box_user: str, seconds: float) -> dict:
    """Requests per second of the two ordinary reads, one after the other."""
    legacy = wrkutil.run(f"{base}/api.php/inbox/{box_legacy}", seconds, connections=32)
    user = wrkutil.run(f"{base}/api/messages?email={box_user}", seconds, connections=32,
                       headers={"Authorization": f"Bearer {key}"})
    return {"legacy": legacy, "user": user, "load": os.getloadavg()[0]}


def wait_held(held: Held, want: int, timeout: float = 120) -> None:
    """Until ``want`` connections are open (a stream once its 200 came, a
    poll once connected), at most ``timeout`` seconds; logs how long it took."""
    started = time.monotonic()
    while held.open_polls + held.open_streams < want and time.monotonic() < started + timeout:
        time.sleep(0.5)
    log(f"{held.open_polls} polls and {held.open_streams} streams open after {time.monotonic() - started:.1f} s")
    time.sleep(2)  # a poll counts as open once connected: give the last requests time to land


def line(kind: str, held_now: int, m: dict) -> str:
    return (f"| {kind:5} | {held_now:5} | {m['legacy'].rps:9.0f} | {m['legacy'].errors:4} | "
            f"{m['user'].rps:9.0f} | {m['user'].errors:4} | {m['load']:5.2f} |")


def worker_rss(box: common.Sandbox) -> str:
    gunicorn = next(s for s in box.servers if s.name == "gunicorn")
    kids = common.child_pids(gunicorn.pid)
    return ", ".join(f"{common.proc_kib(pid, 'VmRSS') // 1024} MiB / "
                     f"{len(os.listdir(f'/proc/{pid}/task'))} threads" for pid in kids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--held", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int,
                        help="gunicorn connections per worker (TEMPMAIL_CONNECTIONS)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 5 s")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 2, 5.0
    raise_fd_limit()
    with common.Sandbox("capacity") as box:
        port = start(box, args.connections)
        base = f"http://127.0.0.1:{port}"
        key = box.api_key()
        polls = [http_json(f"{base}/api.php/generate")["email"] for _ in range(BOXES)]
        streams = [http_json(f"{base}/api/emails", "POST", key)["data"]["email"] for _ in range(BOXES + 1)]
        read_legacy, read_user = polls[0], streams[-1]
        for n in range(5):  # the ordinary reads list a few messages
            send(box.smtp_port, read_legacy, f"listed {n}")
            send(box.smtp_port, read_user, f"listed {n}")
        polls, streams = polls[1:], streams[:-1]
        print(common.machine_line())
        print("| held? | open  | api.php inbox rps | err | User API list rps | err | load1 |")
        print("|-------|-------|-----------|------|-----------|------|-------|")
        held = Held(port, polls, streams, key)
        none, busy = [], []
        for _ in range(args.rounds):
            m = measure(base, key, read_legacy, read_user, args.seconds)
            none.append(m)
            print(line("none", 0, m), flush=True)
            held.start(args.held)
            wait_held(held, args.held)
            opened = held.open_polls + held.open_streams
            m = measure(base, key, read_legacy, read_user, args.seconds)
            busy.append(m)
            print(line("held", opened, m), flush=True)
            rss = worker_rss(box)
            probe = probe_held(box, held, polls[0], streams[0])
            held.close()
            log(f"workers while held: {rss}; probe {probe}; failures so far {dict(held.failures)}; "
                f"waiting {DRAIN} s for the server to let go")
            time.sleep(DRAIN)
        report(none, busy, held, rss, probe)


def probe_held(box: common.Sandbox, held: Held, poll_box: str, stream_box: str) -> str:
    """Mail to one long-polled and one streamed mailbox while all is held:
    250 -> answer/event times."""
    times = []
    for target in (poll_box, stream_box):
        count = len(held.events)
        acked = send(box.smtp_port, target, "probe")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(b == target for b, _ in held.events[count:]):
            time.sleep(0.005)
        got = [t for b, t in held.events[count:] if b == target]
        times.append(f"{(got[0] - acked) * 1000:.0f} ms" if got else "none in 10 s")
    return f"poll {times[0]}, stream {times[1]}"


def report(none: list, busy: list, held: Held, rss: str, probe: str) -> None:
    med = lambda rows, kind: common.median([m[kind].rps for m in rows])
    for kind, label in (("legacy", "GET /api.php/inbox/{email}"), ("user", "GET /api/messages")):
        print(f"{label}: {med(none, kind):.0f} rps with none held, {med(busy, kind):.0f} with "
              f"held ({100 * med(busy, kind) / med(none, kind):.0f} %)")
    print(f"gunicorn workers while held: {rss}")
    print(f"mail while held (250 -> answer): {probe}; held-client failures: "
          f"{dict(held.failures) or 'none'}")
    print(common.machine_line())


if __name__ == "__main__":
    main()
