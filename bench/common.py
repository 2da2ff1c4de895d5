"""Shared helpers of the bench scripts: sandboxes, servers, peers, figures.

Every script builds a throw-away sandbox (its own config JSON, SQLite file,
uploads folder and free ports) and starts the real commands as subprocesses:
``flask --app app smtpd`` and gunicorn exactly as ``make run`` does. The
peers (MailDev, stock Salmon, Postfix's smtp-sink/smtp-source, wrk) are
installed on first use into ``bench/.peers/`` or from Debian, so a fresh
clone needs nothing but ``.venv``.

Nothing here asserts on time: the scripts print figures and leave the
judging to the reader (and ``bench/README.md``).
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
PEERS = BENCH / ".peers"
VENV_BIN = ROOT / ".venv" / "bin"
PYTHON = VENV_BIN / "python"
DOMAIN = "bench.test"
MAILDEV_VERSION = "2.2.1"

# A plan with room for every request a bench sends: the quota counter is
# still written on each request (that cost is real), but never answers 429.
BENCH_PLAN = {"monthly_quota": 1_000_000_000, "domain_types": ["free", "premium"],
              "mailbox_lifetime_seconds": 86400}


def log(*parts) -> None:
    """Progress goes to stderr so stdout carries only the figures."""
    print(*parts, file=sys.stderr, flush=True)


def machine_line() -> str:
    """Date and machine, printed with every set of figures (they are noisy)."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
            f"{os.cpu_count()} cores ({cpu}), Python {platform.python_version()}, load {load}")


# --------------------------------------------------------------------------
# figures

def cpu_idle_share(seconds: float) -> float:
    """The share of the machine's CPU time that was idle over the next ``seconds`` (/proc/stat)."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields[:8])  # idle + iowait, all but guest time
    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(1, total1 - total0)


def settle(max_seconds: float = 5.0, idle: float = 0.85, step: float = 0.25) -> float:
    """Wait until the CPUs were at least ``idle`` idle over one ``step``, at
    most ``max_seconds``; returns the seconds waited. A server stopped by
    the client still works off its backlog: MailDev's email/{id} (p50 250
    ms under wrk) went on for seconds, and the next server measured paid
    for it (TempMail's inbox p99 46-82 ms right after it, 23-27 ms after a
    pause; bench/README, session 8)."""
    started = time.monotonic()
    while time.monotonic() - started < max_seconds and cpu_idle_share(step) < idle:
        pass
    return time.monotonic() - started


def percentile(values, pct: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 100 samples is the 99th)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-pct * len(ordered) // 100))))
    return ordered[rank - 1]


def median(values) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> str:
    """``a / b`` as ``12.3x``, or ``n/a`` when ``b`` measured nothing."""
    if not (b and b == b and a == a):
        return "n/a"
    return f"{a / b:.2f}x" if a / b < 1 else f"{a / b:.1f}x"


def table(rows: list[list], header: list[str]) -> str:
    """A plain left-aligned text table (Markdown-compatible, for README pasting)."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


# --------------------------------------------------------------------------
# processes, ports, memory

def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    """Block until something accepts on ``port``; fail early if ``proc`` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout}s")


def proc_kib(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field in KiB (VmRSS now, VmHWM = peak RSS)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (read from every thread's children list)."""
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(x) for x in (task / "children").read_text().split()]
    return kids


def tree_pids(pid: int) -> list[int]:
    """``pid`` and all its descendants."""
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo += child_pids(current)
    return out


def reset_peak_rss(pid: int) -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs), so a
    peak measured afterwards belongs to the work that follows, not to start-up."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


class Server:
    """A subprocess in its own session (so its whole group can be stopped by its
    id), with stdout/stderr in a log file of the sandbox."""

    def __init__(self, name: str, cmd: list[str], env: dict, logdir: Path, port: int | None,
                 cwd: Path = ROOT):
        self.name, self.port = name, port
        self.logfile = logdir / f"{name}.log"
        self._log = open(self.logfile, "wb")
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.pid = self.proc.pid

    def wait_ready(self, timeout: float = 60) -> "Server":
        if self.port:
            try:
                wait_port(self.port, self.proc, timeout)
            except RuntimeError:
                log(self.tail())
                raise
        return self

    def tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        """SIGTERM to the group this server leads, SIGKILL if it lingers."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()


# --------------------------------------------------------------------------
# what `make run` starts

def make_run_gunicorn(port: int, code: Path = ROOT) -> list[str]:
    """The gunicorn command ``make run`` starts: the line of ``deploy/run.sh``
    (the script the Makefile's ``run`` recipe executes) that starts
    ``$venv/bin/gunicorn``, with its shell variables filled in (host
    127.0.0.1, port ``port``) and the backgrounding ``&`` dropped. Read from
    the script itself, so the bench follows whatever ships."""
    text = (code / "deploy" / "run.sh").read_text().replace("\\\n", " ")
    line = next(l for l in text.splitlines() if "/bin/gunicorn" in l and not l.lstrip().startswith("#"))
    line = line.split("&")[0].strip()
    values = {"venv": str(ROOT / ".venv"), "host": "127.0.0.1", "port": str(port)}
    line = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)], line)
    return shlex.split(line)


# --------------------------------------------------------------------------
# the sandbox: config, database, TempMail servers

class Sandbox:
    """A temporary TempMail installation: config JSON, SQLite file, uploads
    folder, and the servers started for it (stopped on exit)."""

    def __init__(self, name: str = "bench", keep: bool = False, code: Path = ROOT,
                 processes: int | None = None, extra_env: dict | None = None, **config):
        """``code``: the project folder whose code runs (another checkout for
        an A/B comparison in the same run; the venv stays this one's)."""
        self.dir = Path(tempfile.mkdtemp(prefix=f"tempmail-{name}-"))
        self.keep, self.code, self.extra_env = keep, Path(code), dict(extra_env or {})
        self.db_path = self.dir / "tempmail.db"
        self.uploads = self.dir / "uploads"
        self.uploads.mkdir()
        self.smtp_port = free_port()
        self.servers: list[Server] = []
        self.config = {
            "site_name": "TempMail bench",
            "domains": [{"domain": DOMAIN, "type": "free"}],
            "database_url": f"sqlite:///{self.db_path}",
            "uploads_dir": str(self.uploads),
            "timezone": "UTC",
            "mailbox_lifetime_seconds": 86400,
            "reserved_usernames": ["postmaster", "abuse"],
            "max_message_bytes": 26214400,
            "smtp": {"host": "127.0.0.1", "port": self.smtp_port},
            "lmtp": {"socket": None},
            "catch_all": False,
            "plans": {"free": dict(BENCH_PLAN), "premium": dict(BENCH_PLAN)},
            "registration_open": True,
            "cors_origins": "*",
        }
        self.config.update(config)
        if processes:
            self.config["smtp"]["processes"] = processes
        self.config_path = self.dir / "config.json"
        self.config_path.write_text(json.dumps(self.config, indent=2))

    def __enter__(self) -> "Sandbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def env(self) -> dict:
        env = dict(os.environ)
        env.update(TEMPMAIL_CONFIG=str(self.config_path), SECRET_KEY="bench-secret-key",
                   PYTHONUNBUFFERED="1", FLASK_APP="app")
        env.pop("DATABASE_URL", None)
        env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
        env.update(self.extra_env)
        return env

    def flask(self, *args: str, timeout: float = 600) -> str:
        """Run ``flask --app app ARGS`` for this sandbox; returns stdout."""
        res = subprocess.run([str(VENV_BIN / "flask"), "--app", "app", *args], env=self.env(),
                             cwd=self.code, capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"flask {' '.join(args)} failed:\n{res.stdout}\n{res.stderr}")
        return res.stdout

    def start(self, name: str, cmd: list[str], port: int | None, env: dict | None = None,
              cwd: Path | None = None) -> Server:
        server = Server(name, cmd, env or self.env(), self.dir, port, cwd or self.code)
        self.servers.append(server)
        return server.wait_ready()

    def start_smtpd(self, port: int | None = None, extra: list[str] | None = None) -> Server:
        """The mail daemon as ``make run`` starts it (``flask smtpd``, the
        config's ``smtp.processes``); ``extra`` options for A/B runs."""
        port = port or self.smtp_port
        return self.start("smtpd", [str(VENV_BIN / "flask"), "--app", "app", "smtpd",
                                    "--host", "127.0.0.1", "--port", str(port), *(extra or [])], port)

    def start_gunicorn(self, port: int | None = None, access_log: bool = True,
                       extra: list[str] | None = None) -> Server:
        """The web app exactly as ``make run`` serves it (the gunicorn line of
        the Makefile's ``run`` recipe, read from the Makefile itself, so the
        bench follows whatever ships); ``extra`` options go after it (A/B runs)."""
        port = port or free_port()
        cmd = make_run_gunicorn(port, self.code) + list(extra or [])
        if not access_log:
            cmd += ["--access-logfile", "/dev/null"]
        return self.start("gunicorn", cmd, port)

    def start_make_run(self, http_port: int | None = None) -> Server:
        """Both servers exactly as ``make run`` starts them: ``deploy/run.sh``
        (gunicorn with deploy/gunicorn.conf.py, and ``flask smtpd``), with the
        shared metrics folder in the sandbox; waits for both ports."""
        self.http_port = http_port or free_port()
        env = self.env()
        env.update(VENV=str(ROOT / ".venv"), METRICS_DIR=str(self.dir / "metrics"))
        server = self.start("make-run", [str(self.code / "deploy" / "run.sh"), "127.0.0.1", str(self.http_port)],
                            self.smtp_port, env=env)
        wait_port(self.http_port, server.proc)
        return server

    def pids(self, server: Server, word: str) -> list[int]:
        """The processes under ``server`` whose command line holds ``word``
        (``gunicorn``, ``smtpd``), parents before children."""
        found = []
        for pid in tree_pids(server.pid):
            with contextlib.suppress(OSError):
                if word in Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(pid)
        return found

    def db(self) -> sqlite3.Connection:
        """A direct connection to the sandbox's SQLite file (bulk work, counts)."""
        conn = sqlite3.connect(self.db_path, timeout=60, isolation_level=None)
        conn.execute("PRAGMA busy_timeout=60000")
        return conn

    def count(self, table: str = "messages", where: str = "", args: tuple = ()) -> int:
        with contextlib.closing(self.db()) as conn:
            return conn.execute(f"SELECT count(*) FROM {table} {where}", args).fetchone()[0]

    def init_db(self) -> None:
        self.flask("init-db")

    def mailboxes(self, usernames: list[str], lifetime: int = 86400) -> list[str]:
        """Create live mailboxes with the app's own model code; returns addresses."""
        code = ("import sys, models\nfrom app import create_app\nfrom models import Domain, Mailbox\n"
                "app = create_app()\nwith app.app_context():\n"
                "    dom = Domain.by_name(sys.argv[1])\n"
                "    for name in sys.argv[3:]:\n"
                "        Mailbox.create(name, dom, int(sys.argv[2]))\n")
        subprocess.run([str(PYTHON), "-c", code, DOMAIN, str(lifetime), *usernames],
                       env=self.env(), cwd=self.code, check=True, capture_output=True)
        return [f"{u}@{DOMAIN}" for u in usernames]

    def api_key(self, email: str = "bench@users.test") -> str:
        """A User API key for a new user, through the real CLI commands."""
        self.flask("users", "create", email, "--plan", "premium")
        return self.flask("keys", "create", email).strip().splitlines()[-1].strip()

    def close(self) -> None:
        for server in reversed(self.servers):
            server.stop()
        self.servers.clear()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------
# peers and tools, installed on first use

def _apt_install(package: str) -> None:
    """``apt-get install`` one Debian package (update the lists only if needed)."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    if subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", package], env=env,
                      capture_output=True).returncode != 0:
        subprocess.run(sudo + ["apt-get", "update", "-qq"], env=env, check=True, capture_output=True)
        subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", package], env=env, check=True,
                       capture_output=True)


def ensure_wrk() -> str:
    """Path of Debian's ``wrk``, installed when missing."""
    if not shutil.which("wrk"):
        log("installing wrk (apt-get)")
        _apt_install("wrk")
    return shutil.which("wrk") or "/usr/bin/wrk"


def postfix_tool(name: str) -> tuple[str, dict]:
    """Path of ``smtp-source`` / ``smtp-sink`` and the environment they need.

    They come from Debian's ``postfix`` package, downloaded and unpacked into
    bench/.peers/postfix, never installed as a running MTA; their shared
    libraries (libpostfix-*.so) are found through LD_LIBRARY_PATH."""
    root = PEERS / "postfix"
    binary = root / "usr" / "sbin" / name
    if not binary.exists():
        log("fetching Postfix's smtp-source/smtp-sink (apt-get download postfix)")
        with tempfile.TemporaryDirectory() as tmp:
            fetch = ["apt-get", "download", "postfix"]
            if subprocess.run(fetch, cwd=tmp, capture_output=True).returncode != 0:
                subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True)
                subprocess.run(fetch, cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob("postfix_*.deb"))
            root.mkdir(parents=True, exist_ok=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    libdir = root / "usr" / "lib" / "postfix"
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = f"{libdir}:{env.get('LD_LIBRARY_PATH', '')}".rstrip(":")
    return str(binary), env


def maildev_bin() -> str:
    """Path of MailDev 2.2.1 (npm), installed into bench/.peers/maildev when missing.
    (3.x does not install from the registry here, so 2.2.1 is pinned.)"""
    prefix = PEERS / "maildev"
    binary = prefix / "node_modules" / ".bin" / "maildev"
    if not binary.exists():
        if not shutil.which("npm"):
            _apt_install("npm")
        log(f"installing maildev@{MAILDEV_VERSION} (npm) into {prefix}")
        prefix.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(prefix),
                        f"maildev@{MAILDEV_VERSION}"], check=True, capture_output=True)
    return str(binary)


def start_maildev(box: Sandbox) -> tuple[Server, int]:
    """MailDev with its SMTP and web ports on 127.0.0.1; returns (server, web port)."""
    smtp, web = free_port(), free_port()
    maildir = box.dir / "maildev"
    maildir.mkdir(exist_ok=True)
    server = box.start("maildev", [maildev_bin(), "--smtp", str(smtp), "--web", str(web),
                                   "--ip", "127.0.0.1", "--mail-directory", str(maildir),
                                   "--silent"], smtp)
    server.port = smtp
    wait_port(web, server.proc)
    return server, web


def start_stock_salmon(box: Sandbox) -> tuple[Server, Path]:
    """The stock-Salmon peer (bench/peers/stock_salmon.py); returns (server, its SQLite)."""
    port, db_path = free_port(), box.dir / "stock_salmon.db"
    server = box.start("stock-salmon", [str(PYTHON), str(BENCH / "peers" / "stock_salmon.py"),
                                        "--port", str(port), "--db", str(db_path)], port)
    return server, db_path


def start_smtp_sink(box: Sandbox) -> Server:
    """Postfix's smtp-sink: accepts and discards, the protocol ceiling here.
    ``-c`` keeps a count, ``-u`` is needed as root, backlog 256."""
    binary, env = postfix_tool("smtp-sink")
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    return box.start("smtp-sink", [binary, *user, f"127.0.0.1:{port}", "256"], port, env=env)


def ensure_profilers() -> None:
    """py-spy and pyinstrument, pinned in bench/requirements.txt, into .venv."""
    if not (VENV_BIN / "py-spy").exists() or not (VENV_BIN / "pyinstrument").exists():
        log("installing bench/requirements.txt into .venv")
        subprocess.run([str(PYTHON), "-m", "pip", "install", "--quiet", "-r",
                        str(BENCH / "requirements.txt")], check=True)


# --------------------------------------------------------------------------
# mail to fill mailboxes with

def sample_message(rcpt: str, n: int, attachment: bytes | None = None, subject: str | None = None):
    """A realistic small message: text and HTML alternatives, optionally a file."""
    from email.message import EmailMessage
    msg = EmailMessage()
    msg["From"] = f"Sender {n} <sender{n}@source.test>"
    msg["To"] = rcpt
    msg["Subject"] = subject or f"Bench message {n}: your code is 48{n:04d}"
    msg.set_content(f"Hello,\n\nyour one-time code is 48{n:04d}.\n\n-- \nBench\n")
    msg.add_alternative(f"<p>Hello,</p><p>your one-time code is <b>48{n:04d}</b>.</p>", subtype="html")
    if attachment is not None:
        msg.add_attachment(attachment, maintype="application", subtype="pdf", filename=f"invoice-{n}.pdf")
    return msg


def send_messages(port: int, rcpt: str, count: int, attach_every: int = 5) -> None:
    """Deliver ``count`` messages to ``rcpt`` over one SMTP session; every
    ``attach_every``-th carries a 20 KB attachment."""
    import smtplib
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as smtp:
        for n in range(count):
            blob = os.urandom(20 * 1024) if attach_every and n % attach_every == 0 else None
            smtp.send_message(sample_message(rcpt, n, blob), "sender@source.test", [rcpt])
