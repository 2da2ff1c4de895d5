"""Accounts for the User API: sign up, sign in, sign out, password change, and
"API Management" (create / regenerate / revoke the key, plan, quota, the API's
base URL).

Every form is protected by Flask-WTF's app-wide CSRFProtect (the templates
carry ``csrf_token()``). Passwords are hashed with werkzeug.security. Failed
sign-ins are counted per client IP + e-mail (and per IP alone) in the shared
``RateCounter`` table, so the limit holds across worker processes.

Flask's session cookie is signed, not stored: a copy stays valid until it
expires. So a signed-in browser is also a ``UserSession`` row, named by a
random id in the cookie; sign-out deletes the row, and an old copy of the
cookie then opens nothing. Sign-up answers the same whether or not the
address already has an account, so it reveals no more than sign-in does.
"""
from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime
from functools import wraps
from typing import Optional
from urllib.parse import unquote

from flask import (Blueprint, Flask, current_app, flash, g, has_request_context, redirect,
                   render_template, request, session, url_for)
from flask.sessions import SecureCookieSessionInterface
from flask_babel import gettext as _
from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from werkzeug.security import check_password_hash, generate_password_hash

import limits
import webhooks
from clock import now
from models import ApiKey, User, UserSession, cfg, db

bp = Blueprint("accounts", __name__)

EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]+\.[^@\s]{2,}$")
MIN_PASSWORD, MAX_PASSWORD = 8, 200
# Signed-in browsers kept per user; signing in on one more ends the oldest.
MAX_SESSIONS = 20
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


def _token_hash(raw: str) -> str:
    return hashlib.sha256(raw.encode()).hexdigest()


def _oldest_live() -> datetime:
    """Sessions started before this are over, like the cookie's own lifetime."""
    return now() - current_app.permanent_session_lifetime


def current_user() -> Optional[User]:
    """The signed-in user of this request, or None (cached on ``g``)."""
    if "account_user" not in g:
        g.account_user = _session_user()
    return g.account_user


def _session_user() -> Optional[User]:
    """The user whose live ``UserSession`` this cookie names, with the stamp of
    the current password; else None."""
    user_id, raw = session.get("user_id"), session.get("auth")
    if not isinstance(user_id, int) or not isinstance(raw, str):
        return None
    live = db.session.scalar(select(UserSession.id).where(
        UserSession.token_hash == _token_hash(raw), UserSession.user_id == user_id,
        UserSession.created_at >= _oldest_live()))
    user = db.session.get(User, user_id) if live is not None else None
    if user is None or session.get("user_stamp") != session_stamp(user):
        return None
    return user


def start_session(user: User) -> str:
    """Record a new signed-in browser of ``user`` (not committed) and return the
    random id its cookie carries. Ends the user's expired sessions and all but
    the newest ``MAX_SESSIONS``."""
    raw = secrets.token_urlsafe(32)
    db.session.add(UserSession(user_id=user.id, token_hash=_token_hash(raw), created_at=now()))
    db.session.flush()
    newest = (select(UserSession.id).where(UserSession.user_id == user.id)
              .order_by(UserSession.id.desc()).limit(MAX_SESSIONS))
    db.session.execute(delete(UserSession).where(
        UserSession.user_id == user.id,
        (UserSession.created_at < _oldest_live()) | UserSession.id.not_in(newest)))
    return raw


def end_session() -> None:
    """Forget this browser's sign-in, on the server too (not committed)."""
    raw = session.pop("auth", None)
    if isinstance(raw, str):
        db.session.execute(delete(UserSession).where(UserSession.token_hash == _token_hash(raw)))
    session.pop("user_id", None)
    session.pop("user_stamp", None)
    g.pop("account_user", None)


def sign_in_session(user: User) -> None:
    """Sign this browser in as ``user`` with a fresh session id (a browser
    switching accounts also leaves its old session) and commit."""
    end_session()
    raw = start_session(user)
    db.session.commit()
    # Only the account keys change: the visitor's temporary mailbox (web.py's
    # "sid") stays with the browser across sign-in and sign-out.
    session["user_id"], session["user_stamp"], session["auth"] = user.id, session_stamp(user), raw


def login_required(view):
    @wraps(view)
    def wrapped(*args, **kwargs):
        if current_user() is None:
            return redirect(url_for("accounts.signin", next=request.path))
        return view(*args, **kwargs)
    return wrapped


# A plain same-site path: "/" then printable ASCII from RFC 3986's path, query
# and fragment characters only. No control character (browsers silently drop
# tab, CR and LF, so "/\t/host" becomes "//host"), no space, no backslash
# (browsers read "/\host" as "//host"), nothing outside ASCII (fullwidth and
# other look-alike slashes), and "%" only as a complete escape.
_PLAIN_PATH_RE = re.compile(r"/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?#]|%[0-9A-Fa-f]{2})*")
MAX_NEXT = 2048


def safe_next(target: Optional[str]) -> str:
    """Where to go after sign-in: ``target`` when it is a plain path on this
    site, else API Management (no open redirect, no header injection)."""
    if target and len(target) <= MAX_NEXT and _PLAIN_PATH_RE.fullmatch(target):
        # also refuse what only a decoding proxy or server would turn into
        # "//host" or a control character ("/%2F/host", "/%09/host", "/%5Chost")
        decoded = unquote(target)
        if not decoded.startswith("//") and "\\" not in decoded and decoded.isprintable():
            return target
    return url_for("accounts.api_management")


# --------------------------------------------------------------------------
# login rate limiting

def login_buckets(email: str) -> list[tuple[str, str]]:
    """The limits a sign-in attempt counts against: per IP + e-mail (guessing
    one account's password) and per IP alone (trying many accounts)."""
    ip = request.remote_addr or "-"
    return [("login", f"{ip}:{email}"), ("login_ip", ip)]


def authenticate(email: str, password: str) -> Optional[User]:
    """The user whose e-mail and password match, else None (constant-ish time)."""
    user = User.by_email(email)
    if user is None or not user.password_hash:
        check_password_hash(_DUMMY_HASH, password)
        return None
    return user if check_password_hash(user.password_hash, password) else None


# --------------------------------------------------------------------------
# sign up, sign in, sign out

def password_problem(password: str) -> Optional[str]:
    """What is wrong with ``password``, or None: the one rule for the sign-up
    form, the password change and ``flask users create``."""
    if not MIN_PASSWORD <= len(password) <= MAX_PASSWORD:
        return _("Choose a password of %(min)d to %(max)d characters.", min=MIN_PASSWORD, max=MAX_PASSWORD)
    return None


def password_errors(password: str, confirm: str) -> list[str]:
    """What is wrong with a new password and its confirmation."""
    problem = password_problem(password)
    errors = [problem] if problem else []
    if password != confirm:
        errors.append(_("The two passwords do not match."))
    return errors


def signup_errors(email: str, password: str, confirm: str) -> list[str]:
    errors = []
    if not EMAIL_RE.match(email) or len(email) > 254:
        errors.append(_("Enter a valid e-mail address."))
    return errors + password_errors(password, confirm)


def register(email: str, password: str) -> Optional[User]:
    """Create and commit a free-plan user, or None when the e-mail is taken.
    A taken address costs the same password hashing, so the time taken does
    not tell the two apart either."""
    if User.by_email(email) is not None:
        generate_password_hash(password)
        return None
    user = User.create(email, plan="free", password=password)
    try:
        db.session.commit()
    except IntegrityError:  # a concurrent sign-up with the same e-mail won
        db.session.rollback()
        return None
    return user


def signup_blocked() -> bool:
    """Count this well-formed sign-up against the client IP's limit; True once it is spent."""
    return bool(limits.take("signup", request.remote_addr or "-"))


@bp.route("/signup", methods=["GET", "POST"])
def signup():
    """Create an account. A new address and a taken one get the same answer (a
    redirect to sign-in with the same message): the page must not tell a
    stranger who has an account."""
    if not cfg("registration_open"):
        return render_template("account/closed.html"), 403
    email = (request.form.get("email") or "").strip().lower()
    if request.method == "GET":
        return render_template("account/signup.html", email=email)
    password, confirm = request.form.get("password") or "", request.form.get("confirm") or ""
    errors = signup_errors(email, password, confirm)
    blocked = not errors and signup_blocked()
    if blocked:
        errors = [_("Too many sign-ups from your network. Try again in an hour.")]
    if errors:
        for error in errors:
            flash(error, "error")
        return render_template("account/signup.html", email=email), 429 if blocked else 400
    register(email, password)
    session["signin_email"] = email
    # The one answer to a well-formed sign-up, whether the address was free or not.
    flash(_("If this address had no account yet, it has one now: sign in with the password you chose."), "ok")
    return redirect(url_for("accounts.signin"), 303)


@bp.route("/signin", methods=["GET", "POST"])
def signin():
    email = (request.form.get("email") or "").strip().lower()
    next_url = request.values.get("next") or ""
    if request.method == "GET":
        email = session.pop("signin_email", "") if "signin_email" in session else email
        return render_template("account/signin.html", email=email, next_url=next_url)
    # A failure is reserved before the password is checked and given back on
    # success: counting afterwards let parallel guesses all pass the check.
    if limits.take_all(login_buckets(email)):
        flash(_("Too many failed attempts. Wait 15 minutes and try again."), "error")
        return render_template("account/signin.html", email=email, next_url=next_url), 429
    user = authenticate(email, request.form.get("password") or "")
    if user is None:
        flash(_("Wrong e-mail address or password."), "error")
        return render_template("account/signin.html", email=email, next_url=next_url), 401
    for name, bucket in login_buckets(email):
        limits.give_back(name, bucket)
    sign_in_session(user)
    return redirect(safe_next(next_url))


@bp.post("/signout")
def signout():
    """End this browser's session (the user's other browsers stay signed in)."""
    end_session()
    db.session.commit()
    flash(_("You are signed out."), "ok")
    return redirect(url_for("accounts.signin"))


@bp.post("/account/password")
@login_required
def change_password():
    """Change the password: the current one is required and counts as a failed
    sign-in when wrong. Every session of the user ends, and this browser
    continues in a new one, so no copy of any earlier cookie opens the account."""
    user, form = current_user(), request.form
    if limits.take_all(login_buckets(user.email)):  # reserved as a failure, given back below
        flash(_("Too many failed attempts. Wait 15 minutes and try again."), "error")
        return render_template("account/api.html", **management_context(user)), 429
    new = form.get("new_password") or ""
    errors = password_errors(new, form.get("confirm") or "")
    if not user.check_password(form.get("current_password") or ""):
        errors.insert(0, _("Your current password is not correct."))
    else:
        for name, bucket in login_buckets(user.email):
            limits.give_back(name, bucket)
    if errors:
        for error in errors:
            flash(error, "error")
        return render_template("account/api.html", **management_context(user)), 400
    user.set_password(new)
    db.session.execute(delete(UserSession).where(UserSession.user_id == user.id))
    sign_in_session(user)
    flash(_("Your password is changed. Every other browser signed in to this account is signed out."), "ok")
    return redirect(url_for("accounts.api_management"), 303)


# --------------------------------------------------------------------------
# API Management

def management_context(user: User, new_key: Optional[str] = None) -> dict:
    quota = limits.quota_status(user)
    used_pct = min(100, round(100 * quota["used"] / quota["limit"])) if quota["limit"] else 100
    return {"user": user, "key": user.live_key(), "new_key": new_key, "quota": quota, "used_pct": used_pct,
            "reset": quota["reset"].isoformat(), "reset_text": quota["reset"].strftime("%Y-%m-%d %H:%M (UTC%z)"),
            "plan": user.plan_config(),
            "domain_types": user.allowed_domain_types(), "api_base": request.host_url + "api",
            **webhooks.page_context(user.id)}


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


def webhook_problem(exc: webhooks.UnsafeURL) -> str:
    """Why a webhook URL was refused, in the page's language (the User API
    says the same in English)."""
    if exc.kind == "private":
        return _("%(host)s resolves to %(address)s, which is not a public address.", **exc.details)
    if exc.kind == "unresolved":
        return _("The host %(host)s does not resolve.", **exc.details)
    if exc.kind == "credentials":
        return _("A user name or password in the URL is not allowed.")
    return _("Enter an http or https URL of at most %(max)d characters.", max=webhooks.MAX_URL)


@bp.post("/account/webhook")
@login_required
def set_webhook():
    """Set or replace the webhook. Its new secret is rendered into this
    response only (like a new key): shown once, never put in the session."""
    user = current_user()
    try:
        url = webhooks.check_url(request.form.get("url"), webhooks.allow_private())
    except webhooks.UnsafeURL as exc:
        flash(webhook_problem(exc), "error")
        return render_template("account/api.html", **management_context(user),
                               webhook_url=request.form.get("url")), 400
    _hook, secret = webhooks.set_webhook(user.id, url, request.host_url)
    db.session.commit()
    resp = render_template("account/api.html", **management_context(user), new_secret=secret)
    return resp, 201, {"Cache-Control": "no-store"}


@bp.post("/account/webhook/remove")
@login_required
def remove_webhook():
    if webhooks.remove_webhook(current_user().id):
        db.session.commit()
        flash(_("Your webhook is removed. Events not yet delivered were dropped."), "ok")
    return redirect(url_for("accounts.api_management"), 303)


def inject_account():
    """Templates (the header's account links) see the signed-in user."""
    return {"account_user": current_user() if has_request_context() else None,
            "registration_open": cfg("registration_open")}


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
    app.session_interface = SessionInterface()
    if app.config["TEMPMAIL"].get("session_cookie_secure"):
        app.config["SESSION_COOKIE_SECURE"] = True
    app.context_processor(inject_account)
