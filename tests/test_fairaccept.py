"""The web workers share a burst of new connections (fairaccept.FairGeventWorker).

gunicorn runs with deploy/gunicorn.conf.py (the worker class ``make run``
uses) and 2 workers; 200 keep-alive connections open at once, as a client's
connection pool does, while the second worker is briefly stopped (as a
loaded machine delays it), and each sends one request. Which worker holds each
connection is read from the kernel (/proc/net/tcp and each worker's open
sockets), not from the app. With stock gthread (the worker class before
session 8) one worker often accepted them all (bench/README.md, "profile
findings"), and so does stock gevent's; here both must hold some.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.adversarial.helpers import Gunicorn, write_config

CONNECTIONS = 200


def socket_inodes(pid: int) -> set[int]:
    """Inodes of the sockets process ``pid`` has open."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().as_posix()
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def server_side_inodes(server_port: int) -> dict[int, int]:
    """{client port: inode of the server's end} for established connections to ``server_port``."""
    found = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
        if state == "01" and int(local.split(":")[1], 16) == server_port:
            found[int(remote.split(":")[1], 16)] = inode
    return found


def burst(port: int, count: int) -> list[socket.socket]:
    """``count`` connections opened at once (non-blocking connects, all
    SYNs out before any is accepted, as wrk or a connection pool does)."""
    clients = [socket.socket() for _ in range(count)]
    for client in clients:
        client.setblocking(False)
        client.connect_ex(("127.0.0.1", port))
    for client in clients:
        select.select([], [client], [], 30)
        client.setblocking(True)
        client.settimeout(30)
    return clients


def worker_pids(master: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_burst_of_connections_is_shared_between_workers(app, tmp_path):
    # --preload: the app is loaded before the fork, so both workers listen
    # from their first moment (otherwise the first to finish importing the
    # app would take the burst, fairly, since the other is not there yet).
    web = Gunicorn(write_config(app, tmp_path / "web.json"), tmp_path / "gunicorn.log", workers=2,
                   extra=["--config", "deploy/gunicorn.conf.py", "--preload"]).start()
    clients = []
    try:
        deadline = time.monotonic() + 60
        while len(worker_pids(web.proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        log = tmp_path / "gunicorn.log"
        while log.read_text().count("Booting worker") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # the workers enter their accept loops
        _first, second = worker_pids(web.proc.pid)
        # The second worker is kept off the CPU for the first moments of the
        # burst, as a busy machine does to a sibling: stock gevent's first
        # worker then accepts everything in one tight loop before it runs.
        os.kill(second, signal.SIGSTOP)
        try:
            clients = burst(web.port, CONNECTIONS)
            time.sleep(0.03)
        finally:
            os.kill(second, signal.SIGCONT)
        for client in clients:
            client.sendall(b"GET /api.php/domains HTTP/1.1\r\nHost: localhost\r\n\r\n")
        for client in clients:
            assert client.recv(65536).startswith(b"HTTP/1.1 200")
        ends = server_side_inodes(web.port)
        ours = [ends[c.getsockname()[1]] for c in clients]
        held = {pid: sum(1 for inode in ours if inode in socket_inodes(pid)) for pid in worker_pids(web.proc.pid)}
    finally:
        for client in clients:
            client.close()
        web.stop()
    assert sum(held.values()) == CONNECTIONS, held
    # Shared, if not evenly: stock gthread and gevent left the stopped worker nothing or next to nothing.
    assert all(count >= CONNECTIONS // 10 for count in held.values()), f"one worker took (nearly) all: {held}"


PIPELINED = 2000


def count_answers(sock: socket.socket, seen: list, done) -> None:
    """Read ``sock`` until it closes, counting the status lines that arrive."""
    tail = b""
    while True:
        data = sock.recv(65536)
        if not data:
            done.set()
            return
        chunk = tail + data
        seen[0] += chunk.count(b"HTTP/1.1 200")
        tail = chunk[-16:]  # a status line split between two reads is counted once it is whole
        seen[0] -= tail.count(b"HTTP/1.1 200")


@pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
def test_a_busy_connection_does_not_hold_up_another_on_the_same_worker(app, tmp_path):
    """One worker; connection A has 2,000 requests waiting in its socket
    (pipelined), so it always has the next one at hand. B sends one request
    once A has had 100 answers: B's answer must come after a handful more of
    A's (2 here), not after all of them. Stock gevent served A's whole queue
    first (B waited for 1,900 of A's answers: a greenlet that finds its next
    request waiting never yields); a ``sleep(0)`` per request let A run 49
    requests ahead each time, until gevent's callback loop polled the
    sockets again (fairaccept.py)."""
    web = Gunicorn(write_config(app, tmp_path / "web.json"), tmp_path / "gunicorn.log", workers=1,
                   extra=["--config", "deploy/gunicorn.conf.py", "--access-logfile", "/dev/null"]).start()
    try:
        busy = socket.create_connection(("127.0.0.1", web.port), timeout=60)
        seen, done = [0], threading.Event()
        reader = threading.Thread(target=count_answers, args=(busy, seen, done), daemon=True)
        reader.start()
        request = b"GET /api.php/domains HTTP/1.1\r\nHost: localhost\r\n\r\n"
        last = request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")
        busy.sendall(request * (PIPELINED - 1) + last)
        deadline = time.monotonic() + 60
        while seen[0] < 100 and time.monotonic() < deadline:
            time.sleep(0.001)
        at_send = seen[0]
        other = socket.create_connection(("127.0.0.1", web.port), timeout=60)
        other.sendall(last)
        assert other.recv(65536).startswith(b"HTTP/1.1 200")
        at_answer = seen[0]
        other.close()
        assert done.wait(60)
        busy.close()
    finally:
        web.stop()
    assert seen[0] == PIPELINED  # every pipelined request was answered, in its turn
    assert at_answer - at_send < 20, f"B waited for {at_answer - at_send} of A's answers"
