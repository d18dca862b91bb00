"""`baton agents` (which agents this install can run, installing their adapters) and `baton secrets`
(their credentials, kept encrypted under the data dir)."""

from __future__ import annotations

import getpass
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from services.runtime.agent_secrets import AgentSecrets, UnknownSecretName, agent_environ
from services.runtime.settings import Settings
from vm_agent.backends import AGENT_KINDS, AgentKind

agents_app = typer.Typer(help="The coding agents this install can run; install their adapters.")
secrets_app = typer.Typer(help="Agents' credentials (API keys), stored encrypted under the data dir.",
                          no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)

DataDirOption = Annotated[Optional[Path], typer.Option(help="Baton's data dir (or BATON_DATA_DIR)")]
NO_NODE = ("Node.js and npm are needed to install the agents' adapters (Node 20 or newer): "
           "`apt-get install nodejs npm` on Debian/Ubuntu, `brew install node` on macOS, "
           "or see https://nodejs.org/en/download")
INSTALL_TIMEOUT_S = 600
MIN_NODE_MAJOR = 20


def _settings(data_dir: Path | None) -> Settings:
    return Settings(**({"data_dir": data_dir} if data_dir else {}))


@agents_app.callback(invoke_without_command=True)
def agents(ctx: typer.Context, data_dir: DataDirOption = None) -> None:
    """List every agent kind: its pinned adapter, whether it is installed and has its credentials."""
    if ctx.invoked_subcommand is not None:
        return
    settings = _settings(data_dir)
    agents_dir, environ = settings.agents_root, agent_environ(settings)
    fixes = []
    for kind in AGENT_KINDS.values():
        missing = kind.missing_credentials(environ)
        installed = kind.installed(agents_dir)
        typer.echo(f"{kind.name:<9} {kind.npm_spec or 'built in':<46} "
                   f"{'installed' if installed else 'not installed':<14} {_credentials_cell(kind, missing)}")
        if not installed:
            fixes.append(f"baton agents install {kind.name}")
        if missing:
            fixes.append(f"baton secrets set {missing[0][0]}  (for {kind.name})")
    typer.echo(f"agents dir: {agents_dir}")
    if fixes:
        typer.echo("to make them ready: " + "; ".join(fixes))


def _credentials_cell(kind: AgentKind, missing: tuple[tuple[str, ...], ...]) -> str:
    if not kind.requires:
        return "no credentials needed"
    if not missing:
        return "credentials set"
    return "credentials missing: " + "; ".join(" or ".join(group) for group in missing)


@agents_app.command("install")
def install(
    names: Annotated[list[str], typer.Argument(help=", ".join(n for n in AGENT_KINDS if n != "shell"))],
    data_dir: DataDirOption = None,
) -> None:
    """Install the pinned adapter of each agent NAME (npm) into the agents dir."""
    unknown = [name for name in names if name not in AGENT_KINDS]
    if unknown:
        console.print(f"[bold red]error:[/] unknown agent(s) {', '.join(unknown)}; "
                      f"the agents are: {', '.join(AGENT_KINDS)}")
        raise typer.Exit(2)
    agents_dir = _settings(data_dir).agents_root
    for name in names:
        kind = AGENT_KINDS[name]
        if kind.installed(agents_dir):
            console.print(f"{name}: {kind.npm_spec or 'built in'} is installed")
            continue
        npm = shutil.which("npm")
        problem = node_problem()
        if npm is None or problem is not None:
            console.print(f"[bold red]error:[/] {problem or 'npm is not installed'}; {NO_NODE}")
            raise typer.Exit(1)
        console.print(f"{name}: installing {kind.npm_spec}…")
        _npm_install(npm, kind, agents_dir)
        console.print(f"{name}: installed in {kind.install_dir(agents_dir)}")


def node_problem() -> str | None:
    """None if a Node.js the adapters run on (MIN_NODE_MAJOR or newer) is on the PATH, else why not."""
    node = shutil.which("node")
    if node is None:
        return "node is not installed"
    try:
        version = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
        major = int(version.lstrip("v").split(".")[0])
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return "node does not say its version"
    return None if major >= MIN_NODE_MAJOR else f"node {version} is too old"


def _npm_install(npm: str, kind: AgentKind, agents_dir: Path) -> None:
    """npm-install `kind`'s adapter into a temporary directory beside its place, then rename it
    there: a failed or interrupted install leaves nothing half-made where agents look."""
    target = kind.install_dir(agents_dir)
    assert target is not None and kind.npm_spec is not None
    agents_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=agents_dir))
    try:
        done = subprocess.run(
            [npm, "install", "--prefix", str(staging), "--no-audit", "--no-fund", "--loglevel=error",
             kind.npm_spec], stdin=subprocess.DEVNULL, capture_output=True, text=True,
            timeout=INSTALL_TIMEOUT_S)
        if done.returncode != 0:
            console.print(f"[bold red]error:[/] npm install {kind.npm_spec} failed "
                          f"(exit {done.returncode}):\n{done.stderr.strip()[-2000:]}")
            raise typer.Exit(1)
        staging.chmod(0o755)  # Readable by the agents, whoever they run as.
        if target.exists() and not kind.installed(agents_dir):
            shutil.rmtree(target)  # A broken install (its bin gone): replaced.
        try:
            staging.rename(target)
        except OSError:
            if not kind.installed(agents_dir):  # Not another install that finished first.
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@secrets_app.command("set")
def set_secret(
    name: Annotated[str, typer.Argument(help="the variable, e.g. ANTHROPIC_API_KEY")],
    data_dir: DataDirOption = None,
) -> None:
    """Store NAME's value, read from stdin (or asked for, not echoed): never give it as an argument."""
    value = _read_value(name)
    if not value:
        console.print("[bold red]error:[/] no value given (nothing on stdin)")
        raise typer.Exit(2)
    try:
        AgentSecrets.of(_settings(data_dir)).set(name, value)
    except UnknownSecretName as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(2) from None
    console.print(f"{name} is set (encrypted); agents started from now on get it")


def _read_value(name: str) -> str:
    if sys.stdin.isatty():
        return getpass.getpass(f"{name}: ").strip()
    return sys.stdin.read().strip()


@secrets_app.command("list")
def list_secrets(data_dir: DataDirOption = None) -> None:
    """The names of the stored secrets (never their values)."""
    for name in AgentSecrets.of(_settings(data_dir)).names():
        console.print(name)


@secrets_app.command("unset")
def unset_secret(name: str, data_dir: DataDirOption = None) -> None:
    """Forget the stored NAME."""
    try:
        removed = AgentSecrets.of(_settings(data_dir)).unset(name)
    except UnknownSecretName as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(2) from None
    console.print(f"{name} {'unset' if removed else 'was not set'}")
