"""`baton credentials`: NATS credentials for services outside Baton that react to its events.

A reader credential (`--read-only`) is a user JWT of Baton's account allowed only to read the event
stream through its own durable consumer (`reader_permissions`). Each is recorded (name, public key,
when; never the seed) in `<data dir>/nats-auth/readers.json`. Revoking one writes its key into
the account JWT's revocations (kept in every later server configuration) and pushes that JWT to
the running nats-server on `$SYS.REQ.ACCOUNT.<account>.CLAIMS.UPDATE`, which closes its connections
and refuses it from then on.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Optional

import nats
import typer
from rich.console import Console
from rich.table import Table

from services.cli.supervisor import running_nats_url
from services.runtime.nats_auth import (
    InstallAuth,
    decode_claims,
    install_auth_dir,
    raw_credentials,
    reader_durable,
    reader_permissions,
)
from services.runtime.settings import Settings, nats_server_urls, write_private

credentials_app = typer.Typer(help="NATS credentials for services that react to Baton's events.",
                              no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)

DataDirOption = Annotated[Optional[Path], typer.Option(help="Baton's data dir (or BATON_DATA_DIR)")]
NatsOption = Annotated[Optional[str], typer.Option(
    help="NATS URL (or BATON_NATS_URL; else the one the data dir's running `baton up` runs)")]
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,48}$")
PUSH_TIMEOUT_S = 5.0


def _auth(data_dir: Path | None) -> tuple[Settings, InstallAuth]:
    settings = Settings(**({"data_dir": data_dir} if data_dir else {}))
    if not InstallAuth.exists_in(install_auth_dir(settings)):
        console.print(f"[bold red]error:[/] {settings.data_dir} has no NATS operator of its own "
                      "(run `baton up` or `baton nats-config` first)")
        raise typer.Exit(2)
    return settings, InstallAuth(install_auth_dir(settings))


def _running_nats_url(settings: Settings) -> str:
    """BATON_NATS_URL when given, else the NATS the data dir's running `baton up` wrote it runs,
    else the default URL."""
    if "nats_url" in settings.model_fields_set:
        return settings.nats_url
    return running_nats_url(settings) or settings.nats_url


def _readers_path(auth: InstallAuth) -> Path:
    return auth.directory / "readers.json"


def _readers(auth: InstallAuth) -> dict[str, dict]:
    try:
        return json.loads(_readers_path(auth).read_text())
    except FileNotFoundError:
        return {}


def _save_readers(auth: InstallAuth, readers: dict[str, dict]) -> None:
    write_private(_readers_path(auth), json.dumps(readers, indent=1))


@credentials_app.command()
def create(
    name: Annotated[str, typer.Option("--name", help="who holds it (letters, digits, - and _)")],
    read_only: Annotated[bool, typer.Option("--read-only", help="read the event stream, nothing else")] = False,
    out: Annotated[Optional[Path], typer.Option(help="where to write the .creds file (default NAME.creds)")] = None,
    data_dir: DataDirOption = None,
) -> None:
    """Issue a credential reading the event stream through its own durable consumer."""
    if not read_only:
        console.print("[bold red]error:[/] only --read-only credentials can be issued (say --read-only)")
        raise typer.Exit(2)
    if not _NAME.match(name):
        console.print(f"[bold red]error:[/] {name[:60]!r}: a name is 1-48 of letters, digits, - and _")
        raise typer.Exit(2)
    _, auth = _auth(data_dir)
    readers = _readers(auth)
    if name in readers and readers[name].get("revoked_at") is None:
        console.print(f"[bold red]error:[/] {name} already has a credential (revoke it first)")
        raise typer.Exit(1)
    durable = reader_durable(name)
    creds = auth.user_creds(name, reader_permissions(durable))
    path = write_private(out or Path(f"{name}.creds"), creds)
    readers[name] = {"public_key": decode_claims(creds.split("\n")[1])["sub"], "durable": durable,
                     "created_at": int(time.time()), "revoked_at": None}
    _save_readers(auth, readers)
    console.print(f"credential [bold]{name}[/] written to {path} (keep it secret); durable consumer: {durable}")


@credentials_app.command()
def revoke(
    name: Annotated[str, typer.Argument(help="the credential's name")],
    data_dir: DataDirOption = None,
    nats_url: NatsOption = None,
) -> None:
    """Revoke a credential: the running NATS refuses it at once, and at every later start."""
    settings, auth = _auth(data_dir)
    readers = _readers(auth)
    if name not in readers:
        console.print(f"[bold red]error:[/] no credential named {name[:60]!r} (`baton credentials list`)")
        raise typer.Exit(1)
    account_jwt = auth.revoke(readers[name]["public_key"])
    readers[name]["revoked_at"] = int(time.time())
    _save_readers(auth, readers)
    url = nats_url or _running_nats_url(settings)
    try:
        asyncio.run(push_account_jwt(url, auth, account_jwt))
    except Exception as error:  # noqa: BLE001 - unreachable, refused: the user is told what holds.
        console.print(f"[bold red]error:[/] {name} is revoked in {auth.directory}, but NATS at {url} was "
                      f"not told ({error}); it refuses {name} once restarted by `baton up`")
        raise typer.Exit(1) from None
    console.print(f"credential [bold]{name}[/] revoked; NATS at {url} refuses it")


async def push_account_jwt(nats_url: str, auth: InstallAuth, account_jwt: str) -> None:
    """Tell the running server of the account's new JWT (as a system-account user); raises unless
    the server says it took it."""
    # Every server of a cluster hears the request: the system account spans the cluster.
    nc = await nats.connect(nats_server_urls(nats_url), user_credentials=raw_credentials(auth.system_creds()),
                            allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=PUSH_TIMEOUT_S)
    try:
        subject = f"$SYS.REQ.ACCOUNT.{auth.account.public_key.decode()}.CLAIMS.UPDATE"
        reply = json.loads((await nc.request(subject, account_jwt.encode(), timeout=PUSH_TIMEOUT_S)).data)
    finally:
        await nc.close()
    if reply.get("data", {}).get("code") != 200:
        raise RuntimeError(f"the server did not take the account JWT: {reply.get('error') or reply}")


@credentials_app.command("list")
def list_credentials(data_dir: DataDirOption = None) -> None:
    """Every credential issued, its durable consumer, and whether it is revoked."""
    _, auth = _auth(data_dir)
    table = Table("name", "durable", "created", "revoked")
    for name, reader in sorted(_readers(auth).items()):
        table.add_row(name, reader["durable"], _when(reader["created_at"]), _when(reader["revoked_at"]))
    console.print(table)


def _when(timestamp: int | None) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%SZ") if timestamp else "-"
