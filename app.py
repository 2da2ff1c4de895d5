"""TempMail: the application factory, configuration and the wiring of its parts.

The blueprints live in their own modules (api_legacy, api_v1, web, accounts,
apidocs, ops), the CLI commands are registered in cli.py; this module loads
the configuration, sets up the database and assembles them.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import secrets
from pathlib import Path

from flask import Flask, request
from flask_cors import CORS
from flask_wtf.csrf import CSRFProtect
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix
from sqlalchemy import event
from sqlalchemy.engine import Engine

import accounts
import api_legacy
import api_v1
import apidocs
import cli
import models
import ops
import web
from models import db

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("tempmail")
csrf = CSRFProtect()

DEFAULTS = {
    "site_name": "TempMail",
    "domains": [],
    "database_url": "sqlite:///instance/tempmail.db",
    "uploads_dir": "uploads",
    "timezone": "UTC",
    "mailbox_lifetime_seconds": 86400,
    "reserved_usernames": [],
    "max_message_bytes": 26214400,
    "smtp": {"host": "127.0.0.1", "port": 2525, "processes": 1, "max_connections": 500,
             "idle_timeout": 300, "purge_interval": 60, "hostname": None},
    "lmtp": {"socket": None},
    "catch_all": False,
    "max_messages_per_mailbox": 0,
    "max_live_mailboxes": 0,
    "dedupe_window_seconds": 3600,
    "storage": {"backend": "filesystem", "min_free_bytes": None},
    "legacy_api": {"enabled": True},
    "metrics": {"enabled": True, "token": None},
    "rate_limits": {"mailbox_create": {"limit": 30, "window_seconds": 60},
                    "api_mailbox_create": {"limit": 0, "window_seconds": 60},
                    "login": {"limit": 10, "window_seconds": 900},
                    "login_ip": {"limit": 50, "window_seconds": 900}},
    "plans": {
        "free": {"monthly_quota": 50000, "domain_types": ["free"], "mailbox_lifetime_seconds": 600},
        "premium": {"monthly_quota": 500000, "domain_types": ["free", "premium"],
                    "mailbox_lifetime_seconds": 3600},
    },
    "registration_open": True,
    "cors_origins": "*",
}


def load_config(root: Path = ROOT) -> dict:
    """Read ``$TEMPMAIL_CONFIG`` or ``config.json``, falling back to the example
    with a warning; then apply ``DATABASE_URL`` / ``SECRET_KEY`` from the environment."""
    path = Path(os.environ.get("TEMPMAIL_CONFIG") or root / "config.json")
    if not path.is_absolute():
        path = root / path
    if not path.exists():
        log.warning("%s not found; using config.example.json", path)
        path = root / "config.example.json"
    conf = copy.deepcopy(DEFAULTS)
    if path.exists():
        with open(path, encoding="utf-8") as fh:
            deep_merge(conf, json.load(fh))
    if os.environ.get("DATABASE_URL"):
        conf["database_url"] = os.environ["DATABASE_URL"]
    if os.environ.get("SECRET_KEY"):
        conf["secret_key"] = os.environ["SECRET_KEY"]
    return conf


def deep_merge(base: dict, over: dict) -> dict:
    """Merge ``over`` into ``base``: nested sections key by key, anything else replaced."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def resolve_db_url(url: str, root: Path = ROOT) -> str:
    """Make a relative SQLite path relative to the project folder, not the CWD."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and ":memory:" not in url:
        path = root / url[len(prefix):]
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    if url.startswith("postgres://"):  # Heroku-style URLs; SQLAlchemy wants the full name
        url = "postgresql://" + url[len("postgres://"):]
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    return url


def instance_secret(instance: Path) -> str:
    """The secret key stored in ``instance/secret_key``, created on first run.
    Written to a temporary file and hard-linked into place, so concurrent
    workers starting together all end up reading the same complete key."""
    path = instance / "secret_key"
    if not path.exists():
        instance.mkdir(parents=True, exist_ok=True)
        tmp = instance / f".secret_key.{os.getpid()}"
        tmp.write_text(secrets.token_hex(32))
        os.chmod(tmp, 0o600)
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


@event.listens_for(Engine, "connect")
def _sqlite_pragmas(dbapi_conn, _record):
    """WAL for concurrent readers while mail is written, a busy timeout instead of
    'database is locked', and foreign keys on (SQLite leaves them off)."""
    if type(dbapi_conn).__module__.startswith("sqlite3"):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()


def create_app(test_config: dict | None = None) -> Flask:
    """Build the Flask application. ``test_config`` overrides Flask settings, and
    its ``TEMPMAIL`` key overrides entries of the TempMail configuration."""
    app = Flask(__name__, instance_path=str(ROOT / "instance"), instance_relative_config=True)
    test_config = dict(test_config or {})
    conf = load_config()
    deep_merge(conf, test_config.pop("TEMPMAIL", {}))
    app.config["TEMPMAIL"] = conf
    app.config.update(
        SECRET_KEY=conf.get("secret_key") or instance_secret(Path(app.instance_path)),
        SQLALCHEMY_DATABASE_URI=resolve_db_url(conf["database_url"]),
        UPLOADS_DIR=str((ROOT / conf["uploads_dir"]).resolve()),
        MAX_CONTENT_LENGTH=1024 * 1024,
        JSON_SORT_KEYS=False,
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
    )
    app.config.update(test_config)
    app.json.sort_keys = False
    if conf.get("behind_proxy"):
        # nginx / Passenger in front: trust one hop of X-Forwarded-For/-Proto so
        # rate limits see the client's address and cookies get Secure on HTTPS.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)
    db.init_app(app)
    register_parts(app)
    with app.app_context():
        ops.prepare_database()  # creates the tables, or stamps/checks the migration revision
        models.ensure_seed_rows()
    return app


def register_parts(app: Flask) -> None:
    """Attach the blueprints, the CLI commands and the security headers. Each
    API answers its own errors (404, 405, 500) in its own shape."""
    csrf.init_app(app)
    api_legacy.init_app(app)
    api_v1.init_app(app)
    web.init_app(app)
    apidocs.init_app(app)
    accounts.init_app(app)
    ops.init_app(app)
    cli.init_app(app)
    # Every browser form and fetch() of the web pages carries a CSRF token
    # (form field csrf_token or header X-CSRFToken); the two JSON APIs are
    # cookie-less (api.php has no auth, the User API uses Bearer keys).
    csrf.exempt(api_legacy.bp)
    csrf.exempt(api_v1.bp)
    # api.php was called cross-origin by browser front-ends (CORS on in the PHP
    # original); both APIs keep that, for the origins the config allows.
    origins = app.config["TEMPMAIL"]["cors_origins"]
    CORS(app, resources={api_legacy.PATHS: {}, r"/api/*": {}}, origins=origins,
         send_wildcard=origins == "*",
         methods=["GET", "POST", "PUT", "DELETE", "OPTIONS"],
         allow_headers=["Authorization", "Content-Type", "Accept", "Last-Event-ID"],
         expose_headers=["X-RateLimit-Limit", "X-RateLimit-Used", "X-RateLimit-Remaining",
                         "X-RateLimit-Reset", "Retry-After"])
    app.register_error_handler(HTTPException, route_error)
    app.register_error_handler(Exception, unexpected_error)


def owner_of(path: str):
    """The module whose error shape a request gets: the blueprint's that
    matched it, else by path (``/api/`` the User API; the page's own URLs
    the page; any other unknown URL is api.php's ``Invalid endpoint``,
    since api.php answers at the site root)."""
    blueprint = request.blueprint
    if blueprint is not None:
        return {"api_v1": api_v1, "legacy": api_legacy, "legacy_php": api_legacy}.get(blueprint, web)
    if path.startswith("/api/"):
        return api_v1
    return web if web.owns(path) else api_legacy


def route_error(exc: HTTPException):
    """An HTTP error no blueprint handled (no route matched the URL, so no
    blueprint was chosen): the API the path belongs to answers in its shape."""
    return owner_of(request.path).http_error(exc)


def unexpected_error(exc: Exception):
    """A failure outside any blueprint's own handler (a before/after-request hook)."""
    if isinstance(exc, HTTPException):
        return route_error(exc)
    db.session.rollback()
    log.exception("request failed: %s %s", request.method, request.path)
    return owner_of(request.path).server_error()
