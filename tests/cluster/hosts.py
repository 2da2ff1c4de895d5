"""The cluster: one PostgreSQL host, two web hosts (gunicorn) and two mail
hosts (``flask smtpd``), each in its own network namespace (``netns.py``),
all on the database storage backend, sharing nothing but PostgreSQL: each
host has its own ``uploads_dir``, nobody mounts anybody's files.

The test process talks to the hosts only from inside the client host's
namespace (``Cluster.client``): from the machine's own namespace the test
subnet would be routed to the default gateway. Its own checks of the
database go through PostgreSQL's Unix socket, which no namespace affects.
"""
from __future__ import annotations

import http.client
import json
import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from conftest import ROOT, TEST_DOMAINS, as_unprivileged, kill_process, pg_bin, stop_process  # tests/conftest.py
from .netns import Network

VENV_BIN = ROOT / ".venv" / "bin"
WEB_PORT, SMTP_PORT, PG_PORT = 8000, 2525, 5432
ADDRESSES = {"db": 2, "web-a": 11, "web-b": 12, "mail-a": 21, "mail-b": 22, "client": 100}


class Service:
    """One server process inside a host's namespace, in its own process group
    (a kill takes gunicorn's workers with their master)."""

    def __init__(self, cluster: "Cluster", host: str, argv: list[str], port: int, log: Path):
        self.cluster, self.host, self.argv, self.port, self.log = cluster, host, argv, port, log
        self.proc: Optional[subprocess.Popen] = None
        self.address = cluster.net.hosts[host].address

    def start(self) -> "Service":
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cluster.net.command(self.host, self.argv), cwd=ROOT,
                                         env=self.cluster.env(self.host), stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def ready(self, timeout: float = 120) -> "Service":
        self.cluster.wait_for(self.address, self.port, timeout, self)
        return self

    def kill(self) -> None:
        """SIGKILL the whole process group: no clean-up, no last reply."""
        kill_process(self.proc, group=True)

    def stop(self) -> None:
        """SIGTERM: gunicorn finishes the requests it has, the daemon the mail it has."""
        stop_process(self.proc, group=True)

    def pids(self) -> list[int]:
        """The master and its children (gunicorn's workers)."""
        found = [self.proc.pid]
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        if children.exists():
            found += [int(p) for p in children.read_text().split()]
        return found


class Cluster:
    """Build, run and tear down the five hosts; ``admin()`` is an app context
    on the same database for setting up and checking."""

    def __init__(self, workdir: Path, subnet: str = "10.213.7"):
        self.dir = workdir
        self.net = Network(subnet=subnet)
        self.services: dict[str, Service] = {}
        self.pg_dir: Optional[Path] = None
        try:
            for name, octet in ADDRESSES.items():
                self.net.add_host(name, octet)
        except BaseException:
            self.net.destroy()  # half a network is removed before the failure is reported
            raise

    # -- configuration ----------------------------------------------------
    def host_config(self, host: str) -> dict:
        """Every host's config.json: the same database and secret, its own uploads."""
        db_addr = self.net.hosts["db"].address
        return {
            "database_url": f"postgresql://postgres@{db_addr}:{PG_PORT}/tempmail",
            "secret_key": "cluster-test-secret-shared-by-every-host",
            "uploads_dir": str(self.dir / host / "uploads"),
            "domains": TEST_DOMAINS,
            "storage": {"backend": "database"},
            "max_message_bytes": 40 * 1024 * 1024,
            "smtp": {"purge_interval": 0, "idle_timeout": 20, "hostname": f"{host}.cluster.test"},
            "plans": {"free": {"monthly_quota": 30}, "premium": {"monthly_quota": 1_000_000}},
            "rate_limits": {"mailbox_create": {"limit": 12, "window_seconds": 86400}},
            "behind_proxy": False,
        }

    def env(self, host: str) -> dict:
        path = self.dir / host / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.host_config(host)))
        env = dict(os.environ, TEMPMAIL_CONFIG=str(path), PYTHONUNBUFFERED="1")
        env.pop("DATABASE_URL", None)
        return env

    # -- PostgreSQL -------------------------------------------------------
    def start_postgres(self) -> None:
        """initdb, then postgres inside the db host, reachable on its address
        only. Dead peers are noticed within seconds (TCP keepalives) and a
        transaction left idle by a vanished host is ended, as the guide says."""
        self.pg_dir = Path(tempfile.mkdtemp(prefix="tempmail-cluster-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.pg_dir, "nobody", "nogroup")
        data = str(self.pg_dir / "data")
        subprocess.run(as_unprivileged([pg_bin("initdb"), "-D", data, "-U", "postgres", "-A", "trust",
                                        "-E", "UTF8", "--no-locale"]), check=True, cwd=self.pg_dir,
                       stdout=subprocess.DEVNULL)
        with open(Path(data) / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {self.net.subnet}.0/24 trust\n")
        opts = (f"-p {PG_PORT} -k {self.pg_dir} -c listen_addresses={self.net.hosts['db'].address} "
                "-c max_connections=200 -c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                "-c idle_in_transaction_session_timeout=30s -c tcp_keepalives_idle=5 "
                "-c tcp_keepalives_interval=2 -c tcp_keepalives_count=3")
        subprocess.run(self.net.command("db", as_unprivileged(
            [pg_bin("pg_ctl"), "-D", data, "-o", opts, "-w", "-l", str(self.pg_dir / "log"), "start"])),
            check=True, cwd=self.pg_dir, stdout=subprocess.DEVNULL)
        subprocess.run(as_unprivileged([pg_bin("createdb"), "-h", str(self.pg_dir), "-p", str(PG_PORT),
                                        "-U", "postgres", "tempmail"]), check=True, cwd=self.pg_dir)

    def stop_postgres(self) -> None:
        if self.pg_dir is None:
            return
        subprocess.run(as_unprivileged([pg_bin("pg_ctl"), "-D", str(self.pg_dir / "data"), "-m", "immediate",
                                        "stop"]), cwd=self.pg_dir, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        shutil.rmtree(self.pg_dir, ignore_errors=True)

    def local_db_url(self) -> str:
        """The same database through PostgreSQL's Unix socket, for the test's own checks."""
        return f"postgresql+psycopg://postgres@/tempmail?host={self.pg_dir}&port={PG_PORT}"

    # -- the TempMail hosts -------------------------------------------------
    def web(self, host: str, workers: int = 2) -> Service:
        address = self.net.hosts[host].address
        argv = [str(VENV_BIN / "gunicorn"), "--bind", f"{address}:{WEB_PORT}", "--workers", str(workers),
                "--timeout", "60", "--graceful-timeout", "30", "wsgi:application"]
        return Service(self, host, argv, WEB_PORT, self.dir / f"{host}.log")

    def mail(self, host: str) -> Service:
        address = self.net.hosts[host].address
        argv = [str(VENV_BIN / "flask"), "--app", "app", "smtpd", "--host", address, "--port", str(SMTP_PORT),
                "--processes", "1"]  # one receiver per mail host: the hosts are what these tests multiply
        return Service(self, host, argv, SMTP_PORT, self.dir / f"{host}.log")

    def start(self) -> None:
        """PostgreSQL, then the four TempMail hosts at once (the first to come
        up creates the schema; the others wait on its advisory lock)."""
        self.start_postgres()
        for host in ("web-a", "web-b"):
            self.services[host] = self.web(host).start()
        for host in ("mail-a", "mail-b"):
            self.services[host] = self.mail(host).start()
        for service in self.services.values():
            service.ready()

    def restart(self, host: str) -> Service:
        old = self.services[host]
        self.services[host] = Service(self, host, old.argv, old.port, old.log).start().ready()
        return self.services[host]

    def popen_on(self, host: str, args: list[str]) -> subprocess.Popen:
        """``flask ARGS`` started on ``host`` (its namespace, its config), output captured."""
        argv = self.net.command(host, [str(VENV_BIN / "flask"), "--app", "app", *args])
        return subprocess.Popen(argv, cwd=ROOT, env=self.env(host), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def close(self) -> list[str]:
        for service in self.services.values():
            if service.proc is not None and service.proc.poll() is None:
                service.kill()
        self.stop_postgres()
        return self.net.destroy()

    # -- the client's side --------------------------------------------------
    @contextmanager
    def client(self) -> Iterator[None]:
        """The calling thread on the client host: every socket it opens is the client's."""
        with self.net.inside("client"):
            yield

    def wait_for(self, address: str, port: int, timeout: float, service: Optional[Service] = None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if service is not None and service.proc.poll() is not None:
                raise RuntimeError(f"{service.host} exited: {service.log.read_text()[-2000:]}")
            try:
                with self.client():
                    socket.create_connection((address, port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"nothing listens on {address}:{port}")

    def http(self, host: str, method: str, path: str, headers: Optional[dict] = None,
             timeout: float = 30) -> tuple[int, dict, bytes]:
        """One HTTP request to a web host, from the client: (status, headers, body)."""
        with self.client():
            conn = http.client.HTTPConnection(self.net.hosts[host].address, WEB_PORT, timeout=timeout)
            try:
                conn.request(method, path, headers=headers or {})
                resp = conn.getresponse()
                return resp.status, dict(resp.getheaders()), resp.read()
            finally:
                conn.close()

    def smtp(self, host: str, timeout: float = 30) -> smtplib.SMTP:
        """An SMTP session with a mail host, from the client (after EHLO)."""
        with self.client():
            conn = smtplib.SMTP(self.net.hosts[host].address, SMTP_PORT, local_hostname="client.cluster.test",
                                timeout=timeout)
        conn.ehlo("client.cluster.test")
        return conn

    # -- PostgreSQL's figures -------------------------------------------------
    def pg_figures(self, engine) -> dict:
        """The database's position now: transaction ids handed out (one per
        writing transaction; read-only ones take none) and WAL bytes written.
        Both move at once, unlike pg_stat_database's counters, which backends
        report up to seconds later."""
        from sqlalchemy import text
        with engine.connect() as conn:
            row = conn.execute(text(
                "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xids, "
                "pg_current_wal_lsn() - '0/0'::pg_lsn AS wal")).mappings().one()
        return {k: int(v) for k, v in row.items()}
