"""Flask CLI commands (``flask --app app <command>``; the project's .flaskenv sets the app)."""
from __future__ import annotations

import click
from flask import Flask
from flask.cli import AppGroup
from sqlalchemy import select

import models
from models import Domain, db

domains_cli = AppGroup("domains", help="Add and list the mail domains.")


@click.command("init-db")
def init_db_command() -> None:
    """Create the tables and the configured domains (the app also does this on start)."""
    db.create_all()
    models.ensure_seed_rows()
    click.echo("Database ready.")


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


def init_app(app: Flask) -> None:
    """Register every command group on ``app``."""
    app.cli.add_command(init_db_command)
    app.cli.add_command(domains_cli)
    for name in ("mailhandler", "ops"):
        try:
            module = __import__(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        if hasattr(module, "register_cli"):
            module.register_cli(app)
