"""`fourfold token create/list/revoke`: the API's bearer tokens, managed in the store (admin only).

    fourfold token create alice --expires 30d      # prints the token, once
    fourfold token create ops --admin              # sees and cancels every job
    fourfold token list                            # id, user, prefix, times, status; never a token
    fourfold token revoke 3                        # by id (or prefix); refused from the next request

These commands open the store directly, with the settings `fourfold up` uses (`--data-dir`,
FOURFOLD_DATA_DIR, DATABASE_URL): whoever can run them can read the database, which is what makes
them admin commands. The service need not be running, and a running one sees the change at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from api.cli.common import app, fail, settings_or_fail

if TYPE_CHECKING:
    from service.settings import Settings
    from service.tokens import Tokens

token_app = typer.Typer(no_args_is_help=True, help="Manage the API's bearer tokens (admin: opens the store).")
app.add_typer(token_app, name="token")

DataDir = Annotated[Path | None, typer.Option(help="as given to `fourfold up` (default: FOURFOLD_DATA_DIR)")]


def auth_on(settings: Settings) -> bool:
    """Whether the API asks for a token: environment tokens are configured, or the store holds any token
    (even a revoked or expired one)."""
    from service.tokens import auth_required

    if settings.auth_enabled:  # without opening the store
        return True
    with open_tokens(settings) as tokens:
        return auth_required(settings.auth_enabled, tokens)


@contextmanager
def open_tokens(settings: Settings) -> Iterator[Tokens]:
    """The store's tokens table, the store closed afterwards; a store that cannot be opened is a `fail`."""
    from sqlalchemy.exc import SQLAlchemyError

    from service.store import Store
    from service.tokens import Tokens

    try:
        store = Store(settings.db_url)
    except (SQLAlchemyError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise fail(f"cannot open the store (DATABASE_URL / --data-dir): {first}") from None
    try:
        yield Tokens(store)
    finally:
        store.close()


@token_app.command("create")
def create(
    user: Annotated[str, typer.Argument(help="who the token is for: letters, digits, '.', '_', '-'")],
    admin: Annotated[bool, typer.Option("--admin", help="sees and cancels every job")] = False,
    expires: Annotated[
        str | None, typer.Option(help="30d, 12h, 90m, 2w, or a date such as 2026-12-31 (UTC); default: never")
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Make a token for USER and print it (it is shown this once; only its hash is kept)."""
    from service.tokens import check_user_name, parse_expiry

    try:
        check_user_name(user)
        expires_at = parse_expiry(expires) if expires is not None else None
    except ValueError as err:
        raise fail(str(err)) from None
    with open_tokens(settings_or_fail(data_dir=data_dir)) as tokens:
        token, record = tokens.create(user, admin=admin, expires_at=expires_at)
    typer.echo(token)
    kind = "admin token" if admin else "token"
    until = f", expires {_when(record.expires_at)} UTC" if record.expires_at else ", does not expire"
    typer.echo(
        f"fourfold: {kind} {record.id} for {user} ({record.prefix}...{until}); it is not shown again: keep it now",
        err=True,
    )


@token_app.command("list")
def list_(data_dir: DataDir = None) -> None:
    """Every token: id, user, admin, prefix, created, expires, last used, status. Never the token."""
    from service.models import utcnow

    with open_tokens(settings_or_fail(data_dir=data_dir)) as tokens:
        records = tokens.list()
    now = utcnow()
    typer.echo(
        f"{'ID':>4}  {'USER':<16}  {'ADMIN':<5}  {'PREFIX':<11}  {'CREATED':<16}  {'EXPIRES':<16}  "
        f"{'LAST USED':<16}  STATUS"
    )
    for r in records:
        typer.echo(
            f"{r.id:>4}  {r.user[:16]:<16}  {'yes' if r.admin else 'no':<5}  {r.prefix + '...':<11}  "
            f"{_when(r.created_at):<16}  {_when(r.expires_at):<16}  {_when(r.last_used_at):<16}  {r.status(now)}"
        )


@token_app.command("revoke")
def revoke(
    token_id: Annotated[str, typer.Argument(metavar="ID", help="the id (or prefix) `fourfold token list` shows")],
    data_dir: DataDir = None,
) -> None:
    """Revoke a token: the API refuses it from the next request on (it stays listed, as revoked)."""
    from service.tokens import PREFIX_LEN

    with open_tokens(settings_or_fail(data_dir=data_dir)) as tokens:
        try:
            record = tokens.revoke(token_id.strip())
        except KeyError:
            # Never echo a whole token given by mistake.
            shown = token_id if len(token_id) <= PREFIX_LEN else token_id[:PREFIX_LEN] + "..."
            raise fail(f"token {shown}: no such token; `fourfold token list` shows the ids") from None
        except ValueError as err:
            raise fail(str(err)) from None
    typer.echo(f"revoked token {record.id} ({record.user}, {record.prefix}...)")


def _when(t: datetime | None) -> str:
    return "-" if t is None else f"{t:%Y-%m-%d %H:%M}"
