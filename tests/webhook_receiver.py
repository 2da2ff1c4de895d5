"""A webhook receiver for the tests: a real HTTP server on 127.0.0.1 that
records every request and answers what the test tells it to."""
from __future__ import annotations

import hashlib
import hmac
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Received:
    """One request as it arrived."""

    def __init__(self, path: str, headers: dict, body: bytes, answered: int):
        self.path, self.headers, self.body, self.answered = path, headers, body, answered

    @property
    def delivery(self) -> str:
        return self.headers.get("TempMail-Delivery", "")


class Receiver:
    """Answers the statuses queued with ``answer()`` first, then ``default``;
    a 3xx carries ``Location: <url of /elsewhere>``."""

    def __init__(self, default: int = 204, tls: tuple | None = None):
        """``tls``: (certificate file, key file) to serve HTTPS."""
        self.default, self.queued = default, []
        self.hold_at, self.released = 0, threading.Event()
        self.requests: list[Received] = []
        self.changed = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.server.daemon_threads = True
        self.scheme = "https" if tls else "http"
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        return f"{self.scheme}://{host}:{self.port}{path}"

    def answer(self, *statuses: int) -> None:
        with self.changed:
            self.queued += list(statuses)

    def hold(self, n: int) -> None:
        """Keep the ``n``-th request (from 1) waiting for its answer until ``release()``."""
        self.hold_at = n
        self.released.clear()

    def release(self) -> None:
        self.released.set()

    def handler(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver.changed:
                    status = receiver.queued.pop(0) if receiver.queued else receiver.default
                    receiver.requests.append(Received(self.path, dict(self.headers), body, status))
                    held = len(receiver.requests) == receiver.hold_at
                    receiver.changed.notify_all()
                if held:
                    receiver.released.wait(60)
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", receiver.url("/elsewhere"))
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST

            def log_message(self, *_args):
                pass

        return Handler

    def wait_for(self, predicate, timeout: float = 60) -> list[Received]:
        """Wait until ``predicate(requests)`` holds; returns the requests."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while not predicate(self.requests):
                left = deadline - time.monotonic()
                assert left > 0, f"receiver: condition not met; got {[(r.path, r.answered) for r in self.requests]}"
                self.changed.wait(min(left, 0.5))
            return list(self.requests)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def check_signature(secret: str, got: Received) -> None:
    """The TempMail-Signature header is the HMAC-SHA256 of "<t>.<body>" under ``secret``."""
    fields = dict(part.split("=", 1) for part in got.headers["TempMail-Signature"].split(","))
    assert set(fields) == {"t", "v1"}
    expected = hmac.new(secret.encode(), fields["t"].encode() + b"." + got.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(fields["v1"], expected)
    assert abs(int(fields["t"]) - time.time()) < 300


def self_signed(folder) -> tuple:
    """A certificate for localhost and 127.0.0.1 and its key, made with openssl."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
                    "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


class Trickler:
    """A server that accepts, reads the request and then answers one byte of
    a never-ending header every ``pause`` seconds (or, with ``pause`` None,
    never answers at all): only an overall deadline ends such an attempt."""

    def __init__(self, pause: float | None = 0.2):
        self.pause, self.connections = pause, 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _addr = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.trickle, args=(conn,), daemon=True).start()

    def trickle(self, conn: socket.socket) -> None:
        with conn:
            conn.recv(65536)
            answer = b"HTTP/1.1 200 OK\r\n" + b"X-Slow: " + b"a" * 100000
            for i in range(len(answer)):
                if self.stopped.wait(self.pause if self.pause is not None else 60):
                    return
                try:
                    conn.sendall(answer[i:i + 1])
                except OSError:
                    return

    def close(self) -> None:
        self.stopped.set()
        self.sock.close()
