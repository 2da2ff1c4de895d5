"""The webhook sender: claims due outbox rows, POSTs them signed, retries.

It runs as threads of ``flask smtpd`` (in one process of the daemon, the one
with the purge timer) and as ``flask webhooks run`` for deployments without
the daemon (``--once`` for cron). Any number of senders on any number of hosts
share the outbox: a row is claimed by one guarded UPDATE (``claimed_until`` in
the past, set into the future with a random ``claim``), so two senders never
hold the same row at once. A sender killed mid-send leaves its claim to
expire, and the event is sent again with the same ``TempMail-Delivery`` id:
delivery is at least once, and receivers de-duplicate on that id.

Each attempt: the URL's host resolved and every address checked again (so a
name re-pointed at an inner address after ``PUT`` is refused), a connection to
exactly the address checked, a 5 s deadline for the whole exchange, no
redirect followed, the answer's body never read. A failure is retried after
``retry_base_seconds``, then twice as long each time, up to
``retry_max_seconds`` apart, until ``retry_for_seconds`` after the message.
"""
from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import os
import random
import secrets
import signal
import socket
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import NamedTuple, Optional
from urllib.parse import quote, urlsplit

import click
from flask import Flask, current_app
from flask.cli import AppGroup
from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

import clock
import logsafe
import metrics
import webhooks
from models import cfg, db
from webhooks import UnsafeURL, Webhook, WebhookDelivery, WebhookOutbox

log = logging.getLogger("tempmail.webhooks")

USER_AGENT = "TempMail-Webhook/1"
STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
JITTER = 0.1  # up to 10 % added to each delay, so failed events spread out
MAX_ERROR = 300  # characters of an error kept per attempt


class Claim(NamedTuple):
    """An outbox row this sender holds, and the token that proves it."""
    id: int
    token: str


class Outcome(NamedTuple):
    """What one attempt got: an HTTP status, or an error, and how long it took."""
    status: Optional[int]
    error: Optional[str]
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def settings() -> dict:
    return cfg("webhooks")


# --------------------------------------------------------------------------
# one HTTP POST, to the address that was checked

class PinnedConnection(http.client.HTTPConnection):
    """An HTTP connection to ``host`` made to one of the resolved and checked
    ``addresses`` ((family, sockaddr) pairs, tried in order) rather than to
    whatever the name resolves to a moment later (DNS rebinding).
    ``abort()`` from another thread ends it at once."""

    def __init__(self, host: str, port: int, addresses: list[tuple], timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.addresses, self.aborted = addresses, False

    def connect(self) -> None:
        failure: Optional[OSError] = None
        for family, sockaddr in self.addresses:
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                self.sock.settimeout(self.timeout)
                self.sock.connect(sockaddr)
                self.check()
                return
            except OSError as exc:  # refused, unreachable: the next address (a dual-stack name)
                self.sock.close()
                self.sock, failure = None, exc
                self.check()
        raise failure or OSError("no address to connect to")

    def check(self) -> None:
        """Stop here if the deadline passed while connecting (a shutdown of a
        socket that is still connecting does not interrupt it)."""
        if self.aborted:
            raise TimeoutError

    def abort(self) -> None:
        """End the exchange now (called by the deadline's timer thread)."""
        self.aborted = True
        sock = self.sock
        if sock is not None:
            try:
                # The plain socket's shutdown, also under TLS: it wakes a blocked
                # read without touching the TLS object another thread is inside.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


class PinnedTLSConnection(PinnedConnection):
    """HTTPS on the pinned address; the certificate must be valid for the URL's host."""

    default_port = 443
    context: Optional[ssl.SSLContext] = None

    def connect(self) -> None:
        super().connect()
        if PinnedTLSConnection.context is None:  # built once, on first use (reads the CA store)
            PinnedTLSConnection.context = ssl.create_default_context()
        self.sock = PinnedTLSConnection.context.wrap_socket(self.sock, server_hostname=self.host)
        self.check()


def signature(secret: str, body: bytes, timestamp: int) -> str:
    """The ``TempMail-Signature`` value: ``t=<unix seconds>,v1=<hex HMAC-SHA256
    of "<t>.<body>" keyed with the secret>``."""
    mac = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def request_headers(secret: str, body: bytes, event_id: str) -> dict:
    return {"Content-Type": "application/json", "User-Agent": USER_AGENT, "TempMail-Event": webhooks.EVENT,
            "TempMail-Delivery": event_id, "TempMail-Signature": signature(secret, body, clock.timestamp()),
            "Connection": "close"}


def request_target(url: str) -> str:
    """Path and query of ``url`` for the request line, non-ASCII percent-encoded."""
    parts = urlsplit(url)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return quote(target, safe="/?&=%:@!$'()*+,;~-._")


def post(url: str, headers: dict, body: bytes, timeout: float, private_ok: bool) -> int:
    """POST ``body`` to ``url`` and return the status code. The whole exchange
    (connect, TLS, request, status line and headers) has ``timeout`` seconds:
    a receiver that trickles its answer is cut off like a silent one."""
    host, port = webhooks.split_url(url)
    addresses = [(family, sockaddr) for family, _type, _proto, _name, sockaddr
                 in webhooks.resolve(host, port, private_ok)]
    tls = urlsplit(url).scheme.lower() == "https"
    conn = (PinnedTLSConnection if tls else PinnedConnection)(host, port, addresses, timeout)
    deadline = threading.Timer(timeout, conn.abort)
    deadline.start()
    try:
        conn.request("POST", request_target(url), body=body, headers=headers)
        return conn.getresponse().status  # the body is never read: a 3xx is not followed
    except Exception:
        if conn.aborted:
            raise TimeoutError from None
        raise
    finally:
        deadline.cancel()
        conn.close()


def send(url: str, secret: str, body: bytes, event_id: str, timeout: float, private_ok: bool) -> Outcome:
    """One attempt to deliver an event; never raises."""
    started = time.monotonic()
    status, error = None, None
    try:
        status = post(url, request_headers(secret, body, event_id), body, timeout, private_ok)
        if not 200 <= status < 300:
            error = f"HTTP {status}" + (" (redirects are not followed)" if 300 <= status < 400 else "")
    except UnsafeURL as exc:
        error = f"refused: {exc}"
    except Exception as exc:  # whatever the network or the receiver did
        error = describe(exc, timeout)
    elapsed = int((time.monotonic() - started) * 1000)
    return Outcome(status, logsafe.escape(error)[:MAX_ERROR] if error else None, elapsed)


def describe(exc: Exception, timeout: float) -> str:
    """A short, user-readable reason for a failed attempt."""
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}"
    if isinstance(exc, http.client.HTTPException):
        return f"not a valid HTTP answer ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# --------------------------------------------------------------------------
# the outbox: claim, deliver, record

def lease() -> timedelta:
    """How long a claim lasts: longer than any attempt can take (the
    deadline, plus time for the database), short enough that the events of
    a killed sender soon go out from another."""
    return timedelta(seconds=3 * float(settings()["timeout_seconds"]) + 5)


def claim_due(limit: int) -> list[Claim]:
    """Claim up to ``limit`` due events, each by one guarded UPDATE that only
    one sender can win (the WHERE is checked again under the row's lock)."""
    t = clock.now()
    free = or_(WebhookOutbox.claimed_until.is_(None), WebhookOutbox.claimed_until < t)
    due = list(db.session.scalars(select(WebhookOutbox.id).where(WebhookOutbox.next_at <= t, free)
                                  .order_by(WebhookOutbox.next_at, WebhookOutbox.id).limit(limit)))
    claims = []
    for event in due:
        token = secrets.token_hex(16)
        won = db.session.execute(update(WebhookOutbox).where(
            WebhookOutbox.id == event, WebhookOutbox.next_at.is_not(None), free)
            .values(claimed_until=t + lease(), claim=token)).rowcount
        if won:
            claims.append(Claim(event, token))
    db.session.commit()
    return claims


def deliver(claim: Claim) -> Optional[Outcome]:
    """Send one claimed event and record the attempt; None when the event
    is no longer this sender's (its webhook was removed meanwhile)."""
    row = db.session.execute(select(
        WebhookOutbox.event_id, WebhookOutbox.payload, WebhookOutbox.attempts, WebhookOutbox.created_at,
        WebhookOutbox.webhook_id, Webhook.url, Webhook.secret).join(Webhook).where(
        WebhookOutbox.id == claim.id, WebhookOutbox.claim == claim.token)).first()
    db.session.rollback()  # no transaction stays open while the receiver takes its time
    if row is None:
        return None
    conf = settings()
    outcome = send(row.url, row.secret, row.payload.encode("utf-8"), row.event_id,
                   float(conf["timeout_seconds"]), bool(conf["allow_private"]))
    # Fixed label values (never the receiver's words): delivered, refused, failed.
    verdict = "delivered" if outcome.ok else "refused" if (outcome.error or "").startswith("refused") else "failed"
    metrics.WEBHOOK_ATTEMPTS.labels(outcome=verdict).inc()
    if not outcome.ok:
        log.info("webhook event %s attempt %d to %s failed: %s", row.event_id, row.attempts + 1,
                 urlsplit(row.url).hostname, outcome.error)
    record(claim, row, outcome)
    return outcome


def record(claim: Claim, row, outcome: Outcome) -> None:
    """Log the attempt, then mark the event delivered, or due again later,
    or given up; the claim is released in the same commit."""
    t, attempt = clock.now(), row.attempts + 1
    db.session.add(WebhookDelivery(webhook_id=row.webhook_id, event_id=row.event_id, attempt=attempt, at=t,
                                   status_code=outcome.status, duration_ms=outcome.duration_ms,
                                   error=outcome.error, ok=outcome.ok))
    values = {"attempts": attempt, "last_status": outcome.status, "last_error": outcome.error,
              "last_duration_ms": outcome.duration_ms, "claimed_until": None, "claim": None}
    if outcome.ok:
        values.update(delivered_at=t, next_at=None)
    else:
        values["next_at"] = next_attempt(row.created_at, attempt, t)
    try:
        db.session.execute(update(WebhookOutbox).where(
            WebhookOutbox.id == claim.id, WebhookOutbox.claim == claim.token).values(**values))
        trim_attempts(row.webhook_id)
        db.session.commit()
    except IntegrityError:  # the webhook (and its events) were removed during the attempt
        db.session.rollback()


def next_attempt(created: datetime, attempt: int, t: datetime) -> Optional[datetime]:
    """When to try again after ``attempt`` failures, or None to give up."""
    conf = settings()
    delay = min(float(conf["retry_base_seconds"]) * 2 ** min(attempt - 1, 40), float(conf["retry_max_seconds"]))
    due = t + timedelta(seconds=delay * (1 + JITTER * random.random()))
    return due if (due - created).total_seconds() <= float(conf["retry_for_seconds"]) else None


def trim_attempts(webhook_id: int) -> None:
    """Keep the newest ``KEEP_ATTEMPTS`` attempts of the webhook."""
    db.session.flush()
    oldest_kept = db.session.scalar(select(WebhookDelivery.id).where(WebhookDelivery.webhook_id == webhook_id)
                                    .order_by(WebhookDelivery.id.desc()).offset(webhooks.KEEP_ATTEMPTS - 1)
                                    .limit(1))
    if oldest_kept is not None:
        db.session.execute(WebhookDelivery.__table__.delete().where(
            WebhookDelivery.webhook_id == webhook_id, WebhookDelivery.id < oldest_kept))


# --------------------------------------------------------------------------
# the sender: one claiming thread, a pool of senders

class Worker:
    """Sends due events with up to ``webhooks.concurrency`` attempts in flight.
    One thread claims (woken by ``webhooks.wake()`` or every
    ``webhooks.poll_seconds``); a thread pool sends."""

    def __init__(self, app: Flask):
        conf = app.config["TEMPMAIL"]["webhooks"]
        self.app, self.concurrency, self.poll = app, int(conf["concurrency"]), float(conf["poll_seconds"])
        self.stopping = threading.Event()
        self.busy, self.lock = 0, threading.Lock()
        self.pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="webhook-send")
        self.thread = threading.Thread(target=self.run, name="webhook-claim", daemon=True)

    def start(self) -> "Worker":
        # Started with SIGINT and SIGTERM blocked, so that this thread, and the
        # senders and deadline timers it starts (threads inherit the mask),
        # never take a signal meant for the main thread's sigwait (flask smtpd
        # and flask webhooks run stop on it).
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            self.thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        log.info("webhook sender started in process %d (%d at a time)", os.getpid(), self.concurrency)
        return self

    def stop(self, timeout: float = 30) -> None:
        """Claim nothing more; let the attempts in flight finish (each has its deadline)."""
        self.stopping.set()
        webhooks.WAKE.set()
        self.thread.join(timeout)
        self.pool.shutdown(wait=True)

    def run(self) -> None:
        with self.app.app_context():
            while not self.stopping.is_set():
                webhooks.WAKE.clear()
                if self.claim_some() == 0:
                    webhooks.WAKE.wait(self.poll)
            db.session.remove()

    def claim_some(self) -> int:
        """Claim as many due events as there are idle senders and hand them over."""
        with self.lock:
            free = self.concurrency - self.busy
        if free <= 0:
            return 0
        try:
            claims = claim_due(free)
        except SQLAlchemyError:
            db.session.rollback()
            log.exception("claiming webhook events failed")
            return 0
        for claim in claims:
            with self.lock:
                self.busy += 1
            self.pool.submit(self.work, claim)
        return len(claims)

    def work(self, claim: Claim) -> None:
        try:
            with self.app.app_context():
                deliver(claim)
        except Exception:  # a database hiccup: the claim expires and the event goes out later
            log.exception("webhook event %d could not be delivered", claim.id)
        finally:
            with self.lock:
                self.busy -= 1
            webhooks.WAKE.set()

    def drain(self) -> int:
        """Send every event due now, then return how many attempts were made
        (``flask webhooks run --once``); retries that come due later wait."""
        made = 0
        with self.app.app_context():
            while claims := claim_due(self.concurrency):
                list(self.pool.map(self.work_counted, claims))
                made += len(claims)
        self.pool.shutdown(wait=True)
        return made

    def work_counted(self, claim: Claim) -> None:
        with self.lock:
            self.busy += 1
        self.work(claim)


# --------------------------------------------------------------------------
# flask webhooks run

webhooks_cli = AppGroup("webhooks", help="Send the User API's webhook events.")


@webhooks_cli.command("run")
@click.option("--once", is_flag=True, help="Send what is due now, then exit (for cron).")
def run_command(once: bool) -> None:
    """Send webhook events until SIGINT/SIGTERM (``flask smtpd`` sends them too;
    any number of senders may run side by side)."""
    app = current_app._get_current_object()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logsafe.install()
    worker = Worker(app)
    if once:
        click.echo(f"{worker.drain()} webhook attempts made.")
        return
    # Taken with sigwait, not a handler, as flask smtpd does: a handler setting
    # an Event can deadlock when a second signal arrives during the first.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    click.echo("Sending webhook events (Ctrl-C stops).")
    worker.start()
    signal.sigwait(STOP_SIGNALS)
    worker.stop()
    click.echo("Stopped.")
