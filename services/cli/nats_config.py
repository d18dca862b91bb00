"""`baton nats-config`: a nats-server configuration that trusts this install's NATS operator.

For an operator running their own NATS (`baton up --nats-url`): with this configuration the
server refuses every client without a credential minted by this install, exactly like the one
`baton up` starts; each Baton service and vm_agent then gets its own scoped credential.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer

from services.runtime.nats_auth import SYNC_ALWAYS, InstallAuth, install_auth_dir
from services.runtime.settings import Settings, write_private

_SYNC_INTERVAL = re.compile(rf"{SYNC_ALWAYS}|\d+(ms|s|m|h)")


def nats_config(
    data_dir: Annotated[Optional[Path], typer.Option(help="the install's data dir (BATON_DATA_DIR)")] = None,
    store_dir: Annotated[Optional[Path], typer.Option(help="JetStream's store directory")] = None,
    sync_interval: Annotated[str, typer.Option(
        help="when JetStream fsyncs: 'always' (before each ack, so an acked event survives a power loss), "
             "or an interval such as 2m (nats-server's default; see docs/durability.md)")] = SYNC_ALWAYS,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="write here (0600) instead of stdout")] = None,
) -> None:
    """Print (or write) a nats-server configuration trusting this install's operator.

    Run the server with `nats-server -c FILE`, then `baton up --nats-url nats://HOST:PORT`.
    Creates the install's operator and account keys on first use (under the data dir, 0600).
    """
    if not _SYNC_INTERVAL.fullmatch(sync_interval):
        raise typer.BadParameter(f"{sync_interval!r}: give 'always' or a duration such as 500ms, 10s, 2m",
                                 param_hint="--sync-interval")
    settings = Settings(**({"data_dir": data_dir} if data_dir else {}))
    config = InstallAuth(install_auth_dir(settings)).server_config(store_dir=store_dir, sync_interval=sync_interval)
    if output is None:
        typer.echo(config, nl=False)
    else:
        write_private(output, config)
