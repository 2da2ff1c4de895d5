"""Accounts for the User API: sign up, sign in, sign out, and "API Management"
(create / regenerate / revoke the key, plan, quota, the API's base URL).

Every form is protected by Flask-WTF's app-wide CSRFProtect (the templates
carry ``csrf_token()``). Passwords are hashed with werkzeug.security. Failed
sign-ins are counted per client IP + e-mail (and per IP alone) in the shared
``RateCounter`` table, so the limit holds across worker processes.
"""
from __future__ import annotations

import hashlib
import re
from functools import wraps
from typing import Optional

from flask import (Blueprint, Flask, flash, g, has_request_context, redirect, render_template,
                   request, session, url_for)
from flask.sessions import SecureCookieSessionInterface
from flask_babel import gettext as _
from sqlalchemy.exc import IntegrityError
from werkzeug.security import check_password_hash, generate_password_hash

from models import ApiKey, RateCounter, User, cfg, db

bp = Blueprint("accounts", __name__)

EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}$")
MIN_PASSWORD, MAX_PASSWORD = 8, 200
# Failed sign-ins allowed per window: per IP + e-mail (guessing one account's
# password) and per IP alone (trying many accounts).
LOGIN_LIMITS = {"login": (10, 900), "login_ip": (50, 900)}
# Compared against when the e-mail is unknown, so a wrong address takes as long
# as a wrong password and response times do not reveal who has an account.
_DUMMY_HASH = generate_password_hash("not a real password")


class SessionInterface(SecureCookieSessionInterface):
    """Flask's signed-cookie session, with the Secure flag also set whenever the
    request itself came over HTTPS (config can force it on for every request)."""

    def get_cookie_secure(self, app: Flask) -> bool:
        forced = bool(app.config.get("SESSION_COOKIE_SECURE"))
        return forced or (has_request_context() and request.is_secure)


# --------------------------------------------------------------------------
# the signed-in user

def session_stamp(user: User) -> str:
    """Bound to the password hash: changing the password ends every other session."""
    return hashlib.sha256((user.password_hash or "").encode()).hexdigest()[:20]


def current_user() -> Optional[User]:
    """The signed-in user of this request, or None (cached on ``g``)."""
    if "account_user" not in g:
        user = None
        user_id = session.get("user_id")
        if isinstance(user_id, int):
            user = db.session.get(User, user_id)
            if user is not None and session.get("user_stamp") != session_stamp(user):
                user = None
        g.account_user = user
    return g.account_user


def sign_in_session(user: User) -> None:
    # Only the account keys change: the visitor's temporary mailbox (web.py's
    # "sid") stays with the browser across sign-in and sign-out.
    session["user_id"] = user.id
    session["user_stamp"] = session_stamp(user)
    g.pop("account_user", None)


def login_required(view):
    @wraps(view)
    def wrapped(*args, **kwargs):
        if current_user() is None:
            return redirect(url_for("accounts.signin", next=request.path))
        return view(*args, **kwargs)
    return wrapped


def safe_next(target: Optional[str]) -> str:
    """Only same-site paths are followed after sign-in (no open redirect)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return url_for("accounts.api_management")


# --------------------------------------------------------------------------
# login rate limiting

def limit_of(name: str) -> tuple[int, int]:
    """(failures allowed, window seconds); config ``rate_limits.<name>`` overrides."""
    entry = (cfg("rate_limits") or {}).get(name) or {}
    default_limit, default_window = LOGIN_LIMITS[name]
    return int(entry.get("limit", default_limit)), int(entry.get("window_seconds", default_window))


def login_buckets(email: str) -> list[tuple[str, str]]:
    ip = request.remote_addr or "-"
    return [("login", f"login:{ip}:{email}"), ("login_ip", f"login_ip:{ip}")]


def login_blocked(email: str) -> bool:
    """True once this client has used up its failed attempts for the window."""
    for name, bucket in login_buckets(email):
        limit, window = limit_of(name)
        if limit > 0 and RateCounter.peek(bucket, window) >= limit:
            return True
    return False


def record_failed_login(email: str) -> None:
    for name, bucket in login_buckets(email):
        RateCounter.hit(bucket, limit_of(name)[1])


def authenticate(email: str, password: str) -> Optional[User]:
    """The user whose e-mail and password match, else None (constant-ish time)."""
    user = User.by_email(email)
    if user is None or not user.password_hash:
        check_password_hash(_DUMMY_HASH, password)
        return None
    return user if check_password_hash(user.password_hash, password) else None


# --------------------------------------------------------------------------
# sign up, sign in, sign out

def signup_errors(email: str, password: str, confirm: str) -> list[str]:
    errors = []
    if not EMAIL_RE.match(email) or len(email) > 254:
        errors.append(_("Enter a valid e-mail address."))
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        errors.append(_("Choose a password of %(min)d to %(max)d characters.", min=MIN_PASSWORD, max=MAX_PASSWORD))
    if password != confirm:
        errors.append(_("The two passwords do not match."))
    return errors


def register(email: str, password: str) -> Optional[User]:
    """Create and commit a free-plan user, or None when the e-mail is taken."""
    if User.by_email(email) is not None:
        return None
    user = User.create(email, plan="free", password=password)
    try:
        db.session.commit()
    except IntegrityError:  # a concurrent sign-up with the same e-mail won
        db.session.rollback()
        return None
    return user


@bp.route("/signup", methods=["GET", "POST"])
def signup():
    if not cfg("registration_open", True):
        return render_template("account/closed.html"), 403
    email = (request.form.get("email") or "").strip().lower()
    if request.method == "POST":
        password, confirm = request.form.get("password") or "", request.form.get("confirm") or ""
        errors = signup_errors(email, password, confirm)
        user = None if errors else register(email, password)
        if user is not None:
            sign_in_session(user)
            flash(_("Welcome! Your account is ready. Create your API key below."), "ok")
            return redirect(url_for("accounts.api_management"))
        for error in errors or [_("An account with this e-mail address already exists. Sign in instead.")]:
            flash(error, "error")
        return render_template("account/signup.html", email=email), 400 if errors else 409
    return render_template("account/signup.html", email=email)


@bp.route("/signin", methods=["GET", "POST"])
def signin():
    email = (request.form.get("email") or "").strip().lower()
    next_url = request.values.get("next") or ""
    if request.method == "GET":
        return render_template("account/signin.html", email=email, next_url=next_url)
    if login_blocked(email):
        flash(_("Too many failed attempts. Wait 15 minutes and try again."), "error")
        return render_template("account/signin.html", email=email, next_url=next_url), 429
    user = authenticate(email, request.form.get("password") or "")
    if user is None:
        record_failed_login(email)
        flash(_("Wrong e-mail address or password."), "error")
        return render_template("account/signin.html", email=email, next_url=next_url), 401
    sign_in_session(user)
    return redirect(safe_next(next_url))


@bp.post("/signout")
def signout():
    session.pop("user_id", None)
    session.pop("user_stamp", None)
    flash(_("You are signed out."), "ok")
    return redirect(url_for("accounts.signin"))


# --------------------------------------------------------------------------
# API Management

def management_context(user: User, new_key: Optional[str] = None) -> dict:
    quota = user.quota_status()
    used_pct = min(100, round(100 * quota["used"] / quota["limit"])) if quota["limit"] else 100
    return {"user": user, "key": user.live_key(), "new_key": new_key, "quota": quota, "used_pct": used_pct,
            "reset": quota["reset"].isoformat(), "reset_text": quota["reset"].strftime("%Y-%m-%d %H:%M (UTC%z)"),
            "plan": user.plan_config(),
            "domain_types": user.allowed_domain_types(), "api_base": request.host_url + "api"}


@bp.get("/account")
@login_required
def api_management():
    return render_template("account/api.html", **management_context(current_user()))


@bp.post("/account/key")
@login_required
def create_key():
    """Create the key, or regenerate it (the old one is revoked in the same
    transaction). The raw key is rendered into this response only: it is never
    stored, nor put into the (client-readable) session cookie."""
    user = current_user()
    _key, raw = ApiKey.issue(user)
    db.session.commit()
    resp = render_template("account/api.html", **management_context(user, new_key=raw))
    return resp, 201, {"Cache-Control": "no-store"}


@bp.post("/account/key/revoke")
@login_required
def revoke_key():
    key = current_user().live_key()
    if key is not None:
        key.revoke()
        db.session.commit()
        flash(_("Your API key is revoked. Requests using it now answer 401."), "ok")
    return redirect(url_for("accounts.api_management"))


def inject_account():
    """Templates (the header's account links) see the signed-in user."""
    return {"account_user": current_user() if has_request_context() else None,
            "registration_open": cfg("registration_open", True)}


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    app.session_interface = SessionInterface()
    if app.config["TEMPMAIL"].get("session_cookie_secure"):
        app.config["SESSION_COOKIE_SECURE"] = True
    app.context_processor(inject_account)
