"""TempMail: the application factory, configuration and the wiring of its parts.

The blueprints live in their own modules (api_legacy, api_v1, web, cli); this
module loads the configuration, sets up the database and assembles them.
"""
from __future__ import annotations

import copy
import json
import logging
import os
import secrets
from pathlib import Path

from flask import Flask, jsonify, request
from flask_cors import CORS
from flask_wtf.csrf import CSRFProtect
from itsdangerous import BadSignature, URLSafeSerializer
from werkzeug.middleware.proxy_fix import ProxyFix
from sqlalchemy import event
from sqlalchemy.engine import Engine

import models
from models import db

ROOT = Path(__file__).resolve().parent
LEGACY_PATHS = r"^/(api\.php/.*|generate|inbox/.*|email/.*|stats|domains|uploads/attachments/.*)$"
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
    "smtp": {"host": "127.0.0.1", "port": 2525},
    "lmtp": {"socket": None},
    "catch_all": False,
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
            conf.update(json.load(fh))
    if os.environ.get("DATABASE_URL"):
        conf["database_url"] = os.environ["DATABASE_URL"]
    if os.environ.get("SECRET_KEY"):
        conf["secret_key"] = os.environ["SECRET_KEY"]
    return conf


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
    conf.update(test_config.pop("TEMPMAIL", {}))
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
        import ops  # creates the tables, or stamps/checks the migration revision
        ops.prepare_database()
        models.ensure_seed_rows()
    return app


def register_parts(app: Flask) -> None:
    """Attach the blueprints, the CLI commands and the app-wide error handlers."""
    import api_legacy
    import cli

    app.register_blueprint(api_legacy.bp, url_prefix="/api.php", name="legacy_php")
    app.register_blueprint(api_legacy.bp, name="legacy")
    # Every browser form and fetch() of the web pages carries a CSRF token
    # (form field csrf_token or header X-CSRFToken); the two JSON APIs are
    # cookie-less (api.php has no auth, the User API uses Bearer keys).
    csrf.init_app(app)
    csrf.exempt(api_legacy.bp)
    for optional in ("languages", "api_v1", "web", "apidocs", "accounts", "ops"):
        try:
            module = __import__(optional)
        except ModuleNotFoundError as exc:
            if exc.name != optional:
                raise
            continue
        module.init_app(app)
        if optional == "api_v1":
            csrf.exempt(module.bp)
    cli.init_app(app)
    # api.php was called cross-origin by browser front-ends (CORS on in the PHP
    # original); both APIs keep that, for the origins the config allows.
    CORS(app, resources={LEGACY_PATHS: {}, r"/api/*": {}}, origins=app.config["TEMPMAIL"]["cors_origins"],
         send_wildcard=app.config["TEMPMAIL"]["cors_origins"] == "*",
         methods=["GET", "POST", "DELETE", "OPTIONS"], allow_headers=["Authorization", "Content-Type", "Accept"],
         expose_headers=["X-RateLimit-Limit", "X-RateLimit-Used", "X-RateLimit-Remaining",
                         "X-RateLimit-Reset", "Retry-After"])
    app.register_error_handler(404, not_found)
    app.register_error_handler(405, method_not_allowed)


def wants_v1() -> bool:
    return request.path.startswith("/api/")


def not_found(_exc):
    """App-wide 404: blueprint handlers do not fire for URLs no route matches."""
    if wants_v1():
        return jsonify(status=False, message="Not found."), 404
    path = request.path[len("/api.php"):] if request.path.startswith("/api.php/") else request.path
    return jsonify(error=f"Invalid endpoint: {path}"), 404


def method_not_allowed(_exc):
    if wants_v1():
        return jsonify(status=False, message="Method not allowed."), 405
    return jsonify(error="Method not allowed"), 405


def _token_serializer() -> URLSafeSerializer:
    from flask import current_app
    return URLSafeSerializer(current_app.config["SECRET_KEY"], salt="mailbox-token")


def email_token(mailbox) -> str:
    """A signed, opaque token that opens one mailbox's inbox page (``/m/<token>``).
    It binds the mailbox id and its per-mailbox random token, so a deleted and
    re-created address does not reopen with an old token."""
    return _token_serializer().dumps([mailbox.id, mailbox.token])


def mailbox_from_token(token: str):
    """The live mailbox a token was made for, or None."""
    try:
        box_id, box_token = _token_serializer().loads(token)
    except (BadSignature, ValueError, TypeError):
        return None
    box = db.session.get(models.Mailbox, box_id)
    if box is None or box.token != box_token or not box.is_live:
        return None
    return box
