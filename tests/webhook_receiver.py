"""A webhook receiver for the tests: a real HTTP server on 127.0.0.1 that
records every request and answers what the test tells it to."""
from __future__ import annotations

import hashlib
import hmac
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

    def __init__(self, default: int = 204):
        self.default, self.queued = default, []
        self.hold_at, self.released = 0, threading.Event()
        self.requests: list[Received] = []
        self.changed = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

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
