"""`flywheel db …`: migrate and inspect the database."""
from __future__ import annotations

import typer

from store import migrate
from store.errors import StoreError

db_app = typer.Typer(help="Database schema: migrate and inspect.", no_args_is_help=True)


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg="red", err=True)
    raise typer.Exit(2)


@db_app.command()
def upgrade(revision: str = typer.Argument("head", help="Target revision")) -> None:
    """Apply migrations up to REVISION (creates the schema on an empty database)."""
    try:
        migrate.upgrade(revision=revision)
        typer.echo(f"database at revision {migrate.current_revision()}")
    except StoreError as exc:
        _fail(exc)


@db_app.command()
def current() -> None:
    """Show the database's revision and whether it is up to date."""
    try:
        rev, head = migrate.current_revision(), migrate.head_revision()
    except StoreError as exc:
        _fail(exc)
    state = "up to date" if rev == head else f"behind (head is {head}); run `flywheel db upgrade`"
    typer.echo(f"{rev or 'empty'}: {state}")
