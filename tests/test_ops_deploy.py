"""The deployment files under deploy/ and uploads/: checked with the real
tools where this machine can get them (Postfix's postconf, gunicorn), else by
parsing, and against the commands they call."""
from __future__ import annotations

import configparser
import json
import os
import re
import runpy
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT

DEPLOY = ROOT / "deploy"
CACHE = ROOT / "test-artifacts" / "postfix"
LMTP_SOCKET = "/run/tempmail/lmtp.sock"


def fetch_postfix() -> Path | None:
    """Postfix's files unpacked from the Debian package (not installed: no MTA
    runs); cached under test-artifacts/. None when the package is unavailable."""
    root = CACHE / "root"
    if not (root / "usr/sbin/postconf").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        try:
            subprocess.run(["apt-get", "download", "postfix"], cwd=CACHE, check=True, timeout=120,
                           capture_output=True)
            deb = next(CACHE.glob("postfix_*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=60)
        except (OSError, subprocess.SubprocessError, StopIteration):
            return None
    return root


@pytest.fixture(scope="module")
def postconf():
    """A function running ``postconf -c DIR ARGS`` -> CompletedProcess, or None."""
    installed = shutil.which("postconf")
    if installed:
        return lambda conf, *args: subprocess.run([installed, "-c", str(conf), *args],
                                                  capture_output=True, text=True)
    root = fetch_postfix()
    if root is None:
        return None
    env = dict(os.environ, LD_LIBRARY_PATH=str(root / "usr/lib/postfix"))
    return lambda conf, *args: subprocess.run([str(root / "usr/sbin/postconf"), "-c", str(conf), *args],
                                              capture_output=True, text=True, env=env)


def stock_master_cf() -> str:
    for candidate in (CACHE / "root/usr/share/postfix/master.cf.dist", Path("/etc/postfix/master.cf")):
        if candidate.exists():
            return candidate.read_text()
    return ("smtp      inet  n       -       y       -       -       smtpd\n"
            "lmtp      unix  -       -       y       -       -       lmtp\n")


@pytest.fixture
def postfix_dir(tmp_path):
    """A Postfix configuration folder: our main.cf, the stock master.cf plus our lines."""
    (tmp_path / "main.cf").write_text((DEPLOY / "postfix/main.cf").read_text())
    (tmp_path / "master.cf").write_text(stock_master_cf() + (DEPLOY / "postfix/master.cf").read_text())
    return tmp_path


def parse_main_cf(text: str) -> dict:
    """main.cf as Postfix reads it: ``name = value``, indented lines continue."""
    settings, name = {}, None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and name:
            settings[name] += " " + line.strip()
            continue
        name, _, value = line.partition("=")
        name = name.strip()
        settings[name] = value.strip()
    return settings


def test_postfix_snippets(postfix_dir, postconf):
    if postconf is not None:
        shown = postconf(postfix_dir, "-n")
        assert shown.returncode == 0, shown.stderr
        # postconf warns about misspelt or unknown parameters ("unused parameter")
        assert "warning" not in shown.stderr, shown.stderr
        settings = parse_main_cf(shown.stdout)
        service = postconf(postfix_dir, "-M", "tempmail-lmtp/unix")
        assert service.returncode == 0 and service.stderr == "", service.stderr
        fields = service.stdout.split()
    else:
        settings = parse_main_cf((postfix_dir / "main.cf").read_text())
        fields = next(line.split() for line in (postfix_dir / "master.cf").read_text().splitlines()
                      if line.startswith("tempmail-lmtp"))
    assert fields[:2] == ["tempmail-lmtp", "unix"] and fields[4] == "n" and fields[7] == "lmtp"
    assert settings["virtual_transport"] == f"tempmail-lmtp:unix:{LMTP_SOCKET}"
    example = json.loads((ROOT / "config.example.json").read_text())
    assert settings["message_size_limit"] == str(example["max_message_bytes"])
    domains = [d.strip() for d in settings["virtual_mailbox_domains"].split(",")]
    assert domains == [d["domain"] for d in example["domains"]]
    assert "reject_unverified_recipient" in settings["smtpd_recipient_restrictions"]
    assert settings["smtpd_tls_security_level"] == "may"


def unit(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # systemd keys are case-sensitive
    parser.read_string(path.read_text())
    return parser


def test_systemd_units_run_unprivileged(runner):
    web = unit(DEPLOY / "systemd/tempmail-web.service")["Service"]
    mail = unit(DEPLOY / "systemd/tempmail-mail.service")["Service"]
    for service in (web, mail):
        assert service["User"] == "tempmail" and service["NoNewPrivileges"] == "yes"
    # port 25 through the capability, not root
    assert mail["AmbientCapabilities"] == "CAP_NET_BIND_SERVICE"
    assert mail["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    argv = shlex.split(mail["ExecStart"])
    assert argv[1:4] == ["--app", "app", "smtpd"] and argv[argv.index("--port") + 1] == "25"
    help_text = runner.invoke(args=["smtpd", "--help"]).output
    assert "--host" in help_text and "--port" in help_text
    assert Path(LMTP_SOCKET).parent.name == mail["RuntimeDirectory"]


def test_purge_timer_runs_the_purge_command(runner):
    timer = unit(DEPLOY / "systemd/tempmail-purge.timer")
    assert timer["Timer"]["OnCalendar"] == "hourly" and timer["Install"]["WantedBy"] == "timers.target"
    service = unit(DEPLOY / "systemd/tempmail-purge.service")["Service"]
    assert service["Type"] == "oneshot" and service["User"] == "tempmail"
    argv = shlex.split(service["ExecStart"])
    assert argv[1:4] == ["--app", "app", "purge"]
    assert runner.invoke(args=argv[3:]).exit_code == 0


def test_gunicorn_config_loads_the_app(config_file, backend):
    if backend != "sqlite":
        pytest.skip("checks gunicorn's configuration, not the database")
    conf = runpy.run_path(str(DEPLOY / "gunicorn.conf.py"))
    nginx = (DEPLOY / "nginx/tempmail.conf").read_text()
    assert f"proxy_pass http://{conf['bind']};" in nginx
    assert callable(conf["child_exit"])
    web = unit(DEPLOY / "systemd/tempmail-web.service")["Service"]
    assert "deploy/gunicorn.conf.py wsgi:application" in web["ExecStart"]
    env = dict(os.environ, TEMPMAIL_CONFIG=str(config_file))
    check = subprocess.run([str(ROOT / ".venv/bin/gunicorn"), "--check-config", "--config",
                            str(DEPLOY / "gunicorn.conf.py"), "wsgi:application"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr


def test_cron_lines_call_existing_commands(runner):
    lines = [line for line in (DEPLOY / "cpanel/crontab").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert len(lines) == 2
    for line in lines:
        fields = line.split(None, 5)
        assert all(re.fullmatch(r"[\d*/,-]+", f) for f in fields[:5]), line
        flask_args = shlex.split(fields[5].split("&&", 1)[1])
        assert flask_args[0].endswith("/bin/flask") and flask_args[1:3] == ["--app", "app"]
        command, *options = flask_args[3:]
        help_text = runner.invoke(args=[command, "--help"]).output
        assert all(opt in help_text for opt in options), (command, options, help_text)


def test_uploads_htaccess_forbids_executing_and_rendering():
    text = (ROOT / "uploads/.htaccess").read_text()
    directives = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    assert "Require all denied" in directives
    options = next(d for d in directives if d.startswith("Options ")).split()[1:]
    assert {"-ExecCGI", "-Indexes", "-Includes"} <= set(options)
    handlers = next(d for d in directives if d.startswith("RemoveHandler ")).split()[1:]
    assert {".php", ".phtml", ".py", ".cgi", ".pl", ".shtml"} <= set(handlers)
    assert directives.count("php_flag engine off") >= 1
    assert "Header set Content-Disposition attachment" in directives
    assert "Header set X-Content-Type-Options nosniff" in directives


def test_guides_are_linked_and_name_real_files():
    readme = (ROOT / "README.md").read_text()
    for guide in ("docs/deployment.md", "docs/operations.md"):
        assert guide in readme
    text = (ROOT / "docs/deployment.md").read_text() + (ROOT / "docs/operations.md").read_text()
    for path in set(re.findall(r"`(deploy/[\w./-]+)`", text)):
        assert (ROOT / path).exists(), path
