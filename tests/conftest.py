"""Fixtures in the style of the Flask tutorial: ``app``, ``client`` and ``runner``
on a temporary database, plus a real PostgreSQL that the suite starts itself.

Every test that takes ``app`` runs once per backend (SQLite, PostgreSQL);
``TEMPMAIL_TEST_DBS=sqlite`` narrows that while developing.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Optional

import pytest
from sqlalchemy import text

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["TEMPMAIL_CONFIG"] = str(ROOT / "config.example.json")
os.environ.pop("DATABASE_URL", None)

from app import create_app  # noqa: E402
from models import db, ensure_seed_rows  # noqa: E402

# Empty counts as unset: an empty list would skip every database test quietly.
BACKENDS = [b for b in (os.environ.get("TEMPMAIL_TEST_DBS") or "sqlite,postgresql").split(",") if b]
TEST_DOMAINS = [{"domain": "example.com", "type": "free"},
                {"domain": "tempmail.test", "type": "free"},
                {"domain": "vip.example.com", "type": "premium"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pg_bin(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    for candidate in sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), reverse=True):
        return str(candidate)
    pytest.fail(f"PostgreSQL's {name} is not installed (apt-get install postgresql)")


def as_unprivileged(cmd: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: run it as ``nobody`` then."""
    return ["runuser", "-u", "nobody", "--"] + cmd if os.geteuid() == 0 else cmd


class PostgresServer:
    """A throw-away PostgreSQL cluster on a spare loopback port."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="tempmail-pg-"))
        self.port = free_port()
        if os.geteuid() == 0:
            shutil.chown(self.dir, "nobody", "nogroup")
        data = str(self.dir / "data")
        subprocess.run(as_unprivileged([pg_bin("initdb"), "-D", data, "-U", "postgres", "-A", "trust",
                                        "-E", "UTF8", "--no-locale"]), check=True,
                       stdout=subprocess.DEVNULL, cwd=self.dir)
        opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        subprocess.run(as_unprivileged([pg_bin("pg_ctl"), "-D", data, "-o", opts, "-w", "-l",
                                        str(self.dir / "log"), "start"]), check=True,
                       stdout=subprocess.DEVNULL, cwd=self.dir)
        self.data = data

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, name: str) -> str:
        import psycopg
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self):
        subprocess.run(as_unprivileged([pg_bin("pg_ctl"), "-D", self.data, "-m", "immediate", "stop"]),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=self.dir)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres():
    server = PostgresServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pg_test_url(postgres):
    return postgres.create_database("tempmail_test")


class Clock:
    """An injectable clock: starts at the real time, moves only when told."""

    def __init__(self):
        self.now = datetime.now(timezone.utc).replace(tzinfo=None, microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def database_url(backend: str, tmp_path: Path, request) -> str:
    if backend == "sqlite":
        return f"sqlite:///{tmp_path}/tempmail.db"
    return request.getfixturevalue("pg_test_url")


def wipe(app) -> None:
    """Empty every table (PostgreSQL shares one database across tests)."""
    with app.app_context():
        names = ", ".join(t.name for t in db.metadata.sorted_tables)
        db.session.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
        db.session.commit()
        ensure_seed_rows()


@pytest.fixture
def app_factory(backend, tmp_path, request, clock):
    """Build apps on this test's database; ``overrides`` update the TempMail config."""
    url = database_url(backend, tmp_path, request)
    made = []

    def make(overrides: dict | None = None, **flask_config):
        # Every blob in a file: many tests look at the files a delivery, a
        # deletion or a purge leaves. tests/test_storage.py runs its whole
        # suite on the shipped default too (small blobs as rows), and the
        # tests that start the daemon as `make run` does use that default.
        conf = {"database_url": url, "uploads_dir": str(tmp_path / "uploads"),
                "domains": TEST_DOMAINS, "storage": {"inline_max_bytes": 0}}
        conf.update(overrides or {})
        app = create_app({"TESTING": True, "CLOCK": clock, "FSYNC": False, "TEMPMAIL": conf,
                          **flask_config})
        if backend == "postgresql" and not made:
            wipe(app)
        made.append(app)
        return app

    yield make
    dispose(made)


def dispose(apps) -> None:
    """Close every connection the apps' engines hold (PostgreSQL counts them)."""
    for app in apps:
        with app.app_context():
            db.session.remove()
            db.engine.dispose()


@pytest.fixture
def app(app_factory):
    return app_factory()


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture
def runner(app):
    return app.test_cli_runner()


@pytest.fixture
def config_file(app, tmp_path):
    """The app's TempMail configuration written as a JSON file, for servers
    started in subprocesses (``TEMPMAIL_CONFIG``)."""
    path = tmp_path / "config.json"
    conf = dict(app.config["TEMPMAIL"])
    conf["secret_key"] = app.config["SECRET_KEY"]
    path.write_text(json.dumps(conf))
    return path


def kill_process(proc: subprocess.Popen, group: bool = False) -> None:
    """SIGKILL ``proc`` (its whole process group with ``group``): no clean-up,
    no last commit, no reply."""
    if group:
        os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def stop_process(proc: Optional[subprocess.Popen], group: bool = False) -> None:
    """SIGTERM ``proc`` (or its group) if it runs, and wait; SIGKILL after 60 s."""
    if proc is None or proc.poll() is not None:
        return
    if group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        kill_process(proc, group)


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")
