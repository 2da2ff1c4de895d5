"""Flask CLI commands (``flask --app app <command>``; the project's .flaskenv sets the app)."""
from __future__ import annotations

import click
from flask import Flask
from flask.cli import AppGroup, with_appcontext
from sqlalchemy import select

import imapingest
import mailhandler
import models
import ops
import smtpserver
import storagemove
import webhook_worker
from accounts import password_problem
from models import ApiKey, Domain, User, db

domains_cli = AppGroup("domains", help="Add and list the mail domains.")


@click.command("init-db")
@with_appcontext
def init_db_command() -> None:
    """Create the tables (or apply pending migrations) and the configured domains."""
    state = ops.prepare_database(upgrade=True)
    models.ensure_seed_rows()
    click.echo(f"Database ready ({state}).")


@domains_cli.command("add")
@click.argument("name")
@click.option("--type", "type_", type=click.Choice(["free", "premium"]), default="free",
              show_default=True)
@click.option("--custom/--no-custom", default=False, help="Mark as a user's custom domain.")
def domains_add(name: str, type_: str, custom: bool) -> None:
    """Add domain NAME (or change its type)."""
    name = name.strip().lower()
    if "." not in name or any(c in name for c in " /@\\"):
        raise click.BadParameter(f"{name!r} is not a domain name", param_hint="NAME")
    Domain.ensure(name, type_, custom)
    db.session.commit()
    click.echo(f"Domain {name} ({type_}) is active.")


@domains_cli.command("list")
def domains_list() -> None:
    """List every domain with its type and state."""
    for dom in db.session.scalars(select(Domain).order_by(Domain.id)):
        state = "active" if dom.active else "inactive"
        click.echo(f"{dom.name}\t{dom.type}\t{'custom' if dom.custom else '-'}\t{state}")


users_cli = AppGroup("users", help="Create User API accounts.")
keys_cli = AppGroup("keys", help="Issue and revoke User API keys.")


@users_cli.command("create")
@click.argument("email")
@click.option("--plan", default="free", show_default=True, help="A plan of the configuration (free, premium).")
@click.option("--password", default=None, help="Lets the user sign in to the web site too.")
def users_create(email: str, plan: str, password: str | None) -> None:
    """Create the user EMAIL on PLAN."""
    if "@" not in email:
        raise click.BadParameter(f"{email!r} is not an e-mail address", param_hint="EMAIL")
    if plan not in models.cfg("plans"):
        raise click.BadParameter(f"no plan {plan!r} in the configuration", param_hint="--plan")
    if password is not None and (problem := password_problem(password)):
        raise click.BadParameter(problem, param_hint="--password")
    if User.by_email(email) is not None:
        raise click.ClickException(f"user {email} already exists")
    User.create(email, plan=plan, password=password)
    db.session.commit()
    click.echo(f"User {email.strip().lower()} ({plan}) created.")


@keys_cli.command("create")
@click.argument("email")
def keys_create(email: str) -> None:
    """Issue a new key for EMAIL (revoking the old one); the key is the last line."""
    user = User.by_email(email)
    if user is None:
        raise click.ClickException(f"no user {email}; create it with 'flask users create'")
    _key, raw = ApiKey.issue(user)
    db.session.commit()
    click.echo(f"New API key for {user.email}; it is shown only once:")
    click.echo(raw)


@keys_cli.command("revoke")
@click.argument("prefix")
def keys_revoke(prefix: str) -> None:
    """Revoke the key whose prefix is PREFIX (as shown on API Management)."""
    key = db.session.scalar(select(ApiKey).where(ApiKey.prefix == prefix.strip()))
    if key is None or key.revoked_at is not None:
        raise click.ClickException(f"no live key with prefix {prefix}")
    key.revoke()
    db.session.commit()
    click.echo(f"Key {key.prefix} of {key.user.email} revoked.")


def init_app(app: Flask) -> None:
    """Register every command of TempMail: the one place that lists them."""
    for command in (init_db_command, domains_cli, users_cli, keys_cli,  # this module
                    mailhandler.pipe_command, smtpserver.smtpd_command, imapingest.imap_poll_command,
                    ops.purge_command, ops.stats_command, ops.reparse_command, ops.import_command,
                    webhook_worker.webhooks_cli, storagemove.storage_cli):
        app.cli.add_command(command)
