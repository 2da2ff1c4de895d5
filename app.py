"""TempMail: the application factory, configuration and the wiring of its parts.

The blueprints live in their own modules (api_legacy, api_v1, web, accounts,
apidocs, ops), the CLI commands are registered in cli.py; this module loads
the configuration, sets up the database and assembles them.
"""
from __future__ import annotations

import logging
import os
import secrets
import sqlite3
from pathlib import Path

from flask import Flask, request
from flask_cors import CORS
from flask_wtf.csrf import CSRFProtect
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix
from sqlalchemy import event
from sqlalchemy.engine import Engine

import accounts
import apierrors
import api_legacy
import api_v1
import api_webhooks  # noqa: F401  (adds /api/webhook to the User API's blueprint)
import apidocs
import cli
import fastjson
import hotpath
import languages
import listingcache
import logsafe
import models
import ops
import settings
import web
import writelock
from models import db

ROOT = Path(__file__).resolve().parent
log = logging.getLogger("tempmail")
csrf = CSRFProtect()

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
    if isinstance(dbapi_conn, sqlite3.Connection):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        path = next((row[2] for row in cur.execute("PRAGMA database_list") if row[1] == "main"), "")
        cur.close()
        if isinstance(dbapi_conn, writelock.QueuedWriterConnection):
            dbapi_conn.use_lock(writelock.lock_path_for(path))


def engine_options(url: str, conf: dict) -> dict:
    """The connection pool's size (``database_pool_size``). SQLite gets 32 by
    default: its connections are cheap, and with SQLAlchemy's 5 (+10) a busy
    worker's threads queued for one, each return waking a waiter under the
    GIL (13 % of the User API listing's CPU under wrk -c50, bench/README)."""
    size = conf.get("database_pool_size")
    if size is None and url.startswith("sqlite") and ":memory:" not in url:
        size = 32
    options = {"pool_size": size} if size else {}
    # Last in, first out: a thread gets the connection used last, whose SQLite
    # page cache is warm. First in, first out handed out the one idle longest,
    # whose cache any commit by another connection since had voided (WAL), so
    # the writer read its index pages again (bench/README "Session 7").
    if ":memory:" not in url:  # an in-memory SQLite has no pool (one shared connection)
        options["pool_use_lifo"] = True
    return options


def create_app(test_config: dict | None = None) -> Flask:
    """Build the Flask application. ``test_config`` overrides Flask settings, and
    its ``TEMPMAIL`` key is deep-merged over the TempMail configuration.
    Raises ``settings.ConfigError`` for an unknown key or a wrong type."""
    app = Flask(__name__, instance_path=str(ROOT / "instance"), instance_relative_config=True)
    test_config = dict(test_config or {})
    # Defaults, config file, environment, then the caller's overrides, each
    # checked against the schema in settings.py (ConfigError names a bad key).
    conf = settings.load(ROOT, test_config.pop("TEMPMAIL", None))
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
    options = engine_options(app.config["SQLALCHEMY_DATABASE_URI"], conf)
    if app.config["SQLALCHEMY_DATABASE_URI"].startswith("sqlite"):
        # Writers queue for SQLite's one write lock instead of sleeping in its busy handler.
        options["connect_args"] = {"factory": writelock.QueuedWriterConnection}
    app.config["SQLALCHEMY_ENGINE_OPTIONS"] = options
    app.config.update(test_config)
    app.json.sort_keys = False
    fastjson.init_app(app)  # orjson behind jsonify: same JSON, a fraction of the CPU
    # Kept answers of the hot read routes (registered by the API modules) are
    # sent below Flask; inside ProxyFix, so they see the client's scheme and host.
    app.wsgi_app = hotpath.HotPath(app, app.wsgi_app)
    if conf.get("behind_proxy"):
        # nginx / Passenger in front: trust one hop of X-Forwarded-For/-Proto so
        # rate limits see the client's address and cookies get Secure on HTTPS.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=1, x_proto=1, x_host=1)
    db.init_app(app)
    register_parts(app)
    # Control characters in anything logged (addresses, paths, headers) are
    # escaped, so no client can forge a log line.
    logsafe.install([app.logger.name, "gunicorn.error", "gunicorn.access"])
    with app.app_context():
        ops.prepare_database()  # creates the tables, or stamps/checks the migration revision
        models.ensure_seed_rows()
    return app


def register_parts(app: Flask) -> None:
    """Attach the blueprints, the CLI commands and the security headers. Each
    API answers its own errors (404, 405, 500) in its own shape."""
    csrf.init_app(app)
    languages.init_app(app)
    listingcache.init_app(app)
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
    return apierrors.failed(owner_of(request.path).server_error, exc)
