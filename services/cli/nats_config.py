"""`baton nats-config`: a nats-server configuration that trusts this install's NATS operator.

For an operator running their own NATS (`baton up --nats-url`): with this configuration the
server refuses every client without a credential minted by this install, exactly like the one
`baton up` starts; each Baton service and vm_agent then gets its own scoped credential.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from services.runtime.nats_auth import InstallAuth, install_auth_dir
from services.runtime.settings import Settings, write_private


def nats_config(
    data_dir: Annotated[Optional[Path], typer.Option(help="the install's data dir (BATON_DATA_DIR)")] = None,
    store_dir: Annotated[Optional[Path], typer.Option(help="JetStream's store directory")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="write here (0600) instead of stdout")] = None,
) -> None:
    """Print (or write) a nats-server configuration trusting this install's operator.

    Run the server with `nats-server -c FILE`, then `baton up --nats-url nats://HOST:PORT`.
    Creates the install's operator and account keys on first use (under the data dir, 0600).
    """
    settings = Settings(**({"data_dir": data_dir} if data_dir else {}))
    config = InstallAuth(install_auth_dir(settings)).server_config(store_dir=store_dir)
    if output is None:
        typer.echo(config, nl=False)
    else:
        write_private(output, config)
