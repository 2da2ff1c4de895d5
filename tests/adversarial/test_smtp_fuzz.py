"""Bad SMTP input against the real daemon: 10,000 fuzzed sessions, 1,000 idle
connections and slowloris clients. Afterwards the daemon is alive, answers a
normal message at once, and its memory stays bounded (figures printed)."""
from __future__ import annotations

import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .helpers import Daemon, build_message, record, send_one, write_config
from .test_nothing_lost import make_mailboxes

SESSIONS, IDLE, SLOWLORIS = 10_000, 1_000, 20
PEAK_RSS_BOUND_MIB = 300


def pieces(rcpt: str) -> list:
    """Fragments a session is made of: well-formed commands mixed with the
    things mail catchers have choked on."""
    long = b"A" * 100_000
    return [
        b"EHLO fuzz.test\r\n", b"HELO fuzz.test\r\n", b"MAIL FROM:<f@peer.test>\r\n",
        f"RCPT TO:<{rcpt}>\r\n".encode(), b"RCPT TO:<nobody@elsewhere.test>\r\n", b"DATA\r\n",
        b"Subject: fuzz\r\n\r\nbody\r\n.\r\n", b"RSET\r\n", b"NOOP\r\n", b"VRFY root\r\n", b"HELP\r\n",
        b"STARTTLS\r\n", b"AUTH PLAIN AGFhAGI=\r\n", b"BDAT 10 LAST\r\n", b"EXPN list\r\n",
        b"MAIL FROM:<" + long + b">\r\n", b"RCPT TO:<" + long + b"@example.com>\r\n", long + b"\r\n",
        b"EHLO \x00\x00\x00\r\n", b"MAIL FROM:<a\x00b@peer.test>\r\n", b"\x00" * 1000,
        b"EHLO bare.lf\nMAIL FROM:<x@y>\nRCPT TO:<" + rcpt.encode() + b">\nDATA\n", b"\r", b"\n",
        b"MAIL FROM:<f@peer.test> SIZE=999999999999999999999999\r\n",
        b"MAIL FROM:<f@peer.test> BODY=8BITMIME SMTPUTF8 X=" + b"y" * 600 + b"\r\n",
        b"RCPT TO:<" + rcpt.encode() + b"> NOTIFY=NEVER\r\n", b"\xff\xfe\xfd\xc3\x28 garbage\r\n",
        b"..\r\n.\r\n", b"\r\n.\r\n", b"QUIT\r\n", b"quit\r\n", b"mail from:<>\r\n",
        b"RCPT TO:<\"quoted local\\\"\"@example.com>\r\n", b"RCPT TO:<@route,@x:" + rcpt.encode() + b">\r\n",
    ]


def session_payload(rng: random.Random, parts: list) -> bytes:
    """A random pipelined session; about half end with QUIT, the rest just stop."""
    chosen = [rng.choice(parts) for _ in range(rng.randint(1, 12))]
    if rng.random() < 0.1:
        chosen.append(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 3000))))
    if rng.random() < 0.5:
        chosen.append(b"QUIT\r\n")
    return b"".join(chosen)


def run_session(port: int, payload: bytes) -> str:
    """Connect, send everything at once, half-close and read until the daemon
    closes: "closed" when it did, "open" when it still held the session."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.settimeout(2)
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
            return "closed"
    except socket.timeout:
        return "open"
    except OSError:  # reset, broken pipe, or already closed by the daemon before our half-close
        return "reset"


def slowloris(port: int, stop: threading.Event, stats: dict) -> None:
    """Clients that send one byte every two seconds and never finish a line."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(SLOWLORIS)]
    try:
        while not stop.wait(2.0):
            for sock in socks:
                try:
                    sock.send(b"E")
                    stats["bytes"] += 1
                except OSError:
                    stats["dropped"] += 1
    finally:
        for sock in socks:
            sock.close()


def test_fuzzed_sessions_idle_connections_and_slowloris(app, tmp_path):
    (rcpt,) = make_mailboxes(app, 1, "fuzz")
    config = write_config(app, tmp_path / "fuzz.json",
                          smtp={"host": "127.0.0.1", "port": 0, "max_connections": 1500, "idle_timeout": 300})
    daemon = Daemon(config, tmp_path / "smtpd.log").start()
    try:
        before = daemon.memory()
        code, baseline = send_one(daemon.port, rcpt, build_message(1, rcpt, tag="probe"))
        assert code == 250
        rng, parts = random.Random(8), pieces(rcpt)
        payloads = [session_payload(rng, parts) for _ in range(SESSIONS)]
        started = time.perf_counter()
        with ThreadPoolExecutor(32) as pool:
            outcomes = list(pool.map(lambda p: run_session(daemon.port, p), payloads))
        fuzz_seconds = time.perf_counter() - started
        assert daemon.proc.poll() is None, "the daemon died during the fuzzing"
        after_fuzz = daemon.memory()

        stop, slow_stats = threading.Event(), {"bytes": 0, "dropped": 0}
        slow = threading.Thread(target=slowloris, args=(daemon.port, stop, slow_stats))
        slow.start()
        idle = [socket.create_connection(("127.0.0.1", daemon.port), timeout=10) for _ in range(IDLE)]
        greeted = sum(1 for sock in idle if sock.recv(100).startswith(b"220"))
        time.sleep(4.5)  # slowloris sends two more bytes meanwhile
        code_during, during = send_one(daemon.port, rcpt, build_message(2, rcpt, tag="probe"))
        stop.set()
        slow.join()
        for sock in idle:
            sock.close()
        code_after, after = send_one(daemon.port, rcpt, build_message(3, rcpt, tag="probe"))
        memory = daemon.memory()
        assert daemon.proc.poll() is None
    finally:
        daemon.stop()
    log = (tmp_path / "smtpd.log").read_text(errors="replace")
    crashes = log.count("Traceback")
    sizes = sorted(len(p) for p in payloads)
    record("bad SMTP input", f"{SESSIONS} fuzzed sessions (payload {sizes[0]} B to {sizes[-1] // 1024} KiB: "
           f"100 KB lines, NUL, bare LF, pipelined garbage, no QUIT) in {fuzz_seconds:.1f} s: "
           f"{outcomes.count('closed')} closed by the daemon, {outcomes.count('reset')} reset, "
           f"{outcomes.count('open')} held open")
    record("bad SMTP input", f"{IDLE} idle connections ({greeted} greeted) + {SLOWLORIS} slowloris "
           f"clients (1 byte / 2 s): a normal message took {during * 1000:.0f} ms meanwhile, "
           f"{after * 1000:.0f} ms afterwards (baseline {baseline * 1000:.0f} ms)")
    record("bad SMTP input", f"daemon RSS {before['VmRSS'] // 1024} MiB at start, "
           f"{after_fuzz['VmRSS'] // 1024} MiB after fuzzing, {memory['VmRSS'] // 1024} MiB at the end; "
           f"peak {memory['VmHWM'] // 1024} MiB (bound {PEAK_RSS_BOUND_MIB}); tracebacks in its log: {crashes}")
    assert code_during == 250 and code_after == 250
    assert greeted == IDLE
    assert outcomes.count("open") == 0
    assert crashes == 0
    assert memory["VmHWM"] // 1024 < PEAK_RSS_BOUND_MIB
