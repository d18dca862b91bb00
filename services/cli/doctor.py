"""`baton doctor`: what this install needs, checked, each with what to do about it.

Each check looks and never changes anything (no data dir, key or store is created). A check that
is `required` and fails makes `baton doctor` exit 1; the others are advice.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from services.runtime.nats_server import (HOW_TO_GET_IT, MIN_VERSION, NatsServerError, locate_nats_server,
                                          nats_server_version)
from services.runtime.settings import Settings

MIN_NODE = 20
MIN_FREE_BYTES = 1 << 30
"""Below 1 GiB free in the data dir a task's clone, its stores and the stream soon fail."""
_VERSION = re.compile(r"(\d+)\.(\d+)")
Which = Callable[[str], Optional[str]]


@dataclass(frozen=True)
class Finding:
    """One check's outcome: `ok`, what was found, and (when not ok) what to do."""

    name: str
    ok: bool
    found: str
    fix: str = ""
    required: bool = True

    @property
    def blocks(self) -> bool:
        return self.required and not self.ok


def version_of(command: list[str]) -> tuple[int, int] | None:
    """The first `major.minor` a command's `--version` prints, or None if it cannot run."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = _VERSION.search(done.stdout + done.stderr)
    return (int(found.group(1)), int(found.group(2))) if found else None


def check_git(which: Which = shutil.which) -> Finding:
    path = which("git")
    if path is None:
        return Finding("git", False, "not on PATH", "install git (Debian/Ubuntu: `sudo apt-get install git`)")
    return Finding("git", True, path)


def check_nats_server(locate: Callable[[], Optional[str]] = locate_nats_server) -> Finding:
    """The nats-server `baton up` would run (the venv's, else PATH's), with its version."""
    path = locate()
    fix = f"{HOW_TO_GET_IT}; or run `baton up --nats-url` against a NATS with JetStream you already run"
    if path is None:
        return Finding("nats-server", False, "not in Baton's venv nor on PATH", fix)
    try:
        version = nats_server_version(path)
    except NatsServerError:
        return Finding("nats-server", False, f"{path}: version unknown", fix)
    found = f"{path} {'.'.join(map(str, version))}"
    if version < MIN_VERSION:
        return Finding("nats-server", False, f"{found}, older than {'.'.join(map(str, MIN_VERSION))}", fix)
    return Finding("nats-server", True, found)


def check_node(which: Which = shutil.which, *, agents_installed: bool = False) -> Finding:
    """Node runs the real agents' adapters: required once one is installed."""
    path = which("node")
    version = version_of([path, "--version"]) if path else None
    if version is not None and version[0] >= MIN_NODE:
        return Finding("node", True, f"{path} {version[0]}.{version[1]}", required=agents_installed)
    return Finding("node", False, f"{path or 'not on PATH'}" + (f": version {version}" if version else ""),
                   f"install Node.js ≥ {MIN_NODE} for real agents (claude, codex, gemini, opencode); "
                   "the `shell` agent needs none", required=agents_installed)


def check_sandbox(settings: Settings) -> Finding:
    from vm_agent.sandbox import bwrap_problem  # runs bwrap once to see that it can confine

    problem = bwrap_problem()
    required = settings.sandbox == "bwrap"
    if problem is None:
        return Finding("bubblewrap", True, "bwrap makes the agents' sandbox", required=required)
    return Finding("bubblewrap", False, problem,
                   "install bubblewrap (`sudo apt-get install bubblewrap`) and allow unprivileged user "
                   "namespaces; until then agents run unconfined (BATON_SANDBOX=auto)", required=required)


def check_postgres(settings: Settings) -> Finding | None:
    """Only when BATON_DATABASE_URL is set (else the stores are SQLite in the data dir)."""
    if not settings.database_url:
        return None
    import psycopg

    try:
        with psycopg.connect(settings.database_url, connect_timeout=5) as db:
            version = db.execute("SHOW server_version").fetchone()[0]
    except psycopg.Error as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        return Finding("postgresql", False, f"cannot connect: {_without_url(reason, settings.database_url)}",
                       "start PostgreSQL or fix BATON_DATABASE_URL (postgresql://user:password@host:5432/db)")
    return Finding("postgresql", True, f"connected (server {version})")


def check_agents(settings: Settings, environ: Mapping[str, str]) -> list[Finding]:
    """Each real agent: installed, and its credentials set (never their values). Advice only."""
    from vm_agent.backends import BACKENDS

    findings = []
    for kind in BACKENDS.values():
        if kind.package is None:
            continue
        installed, missing = kind.installed(settings.agents_root), kind.missing_credentials(environ)
        fix = []
        if not installed:
            fix.append(f"`baton agents install {kind.name}`")
        if missing:
            fix.append("set " + " and ".join(" or ".join(group) for group in missing)
                       + f" (`baton secrets set {missing[0][0]}` or the environment)")
        found = ("installed" if installed else "not installed") + (", credentials set" if not missing else "")
        findings.append(Finding(f"agent {kind.name}", installed and not missing, found, "; ".join(fix),
                                required=False))
    return findings


def check_nats_auth(settings: Settings) -> Finding:
    from services.runtime.nats_auth import InstallAuth, install_auth_dir

    directory = install_auth_dir(settings)
    if InstallAuth.exists_in(directory):
        return Finding("nats auth", True, f"install keys in {directory}")
    return Finding("nats auth", False, f"no install keys in {directory}",
                   "`baton up` creates them on its first start; a NATS you run yourself needs "
                   "`baton nats-config` (else the bus is open to anyone who reaches it)", required=False)


def check_data_dir(settings: Settings) -> Finding:
    """The data dir (or, before the first start, the dir it will be made in) is this user's only."""
    data_dir = settings.data_dir
    if not data_dir.exists():
        parent = next(p for p in data_dir.parents if p.exists())
        ok = os.access(parent, os.W_OK | os.X_OK)
        return Finding("data dir", ok, f"{data_dir} (made on first start)" if ok else f"{parent} not writable",
                       "" if ok else f"make {parent} writable or set BATON_DATA_DIR")
    info = data_dir.stat()
    if info.st_uid != os.getuid() or not os.access(data_dir, os.W_OK | os.X_OK):
        return Finding("data dir", False, f"{data_dir} is not this user's to write",
                       f"`sudo chown -R $USER {data_dir}` or set BATON_DATA_DIR")
    if stat.S_IMODE(info.st_mode) & 0o077:
        return Finding("data dir", False, f"{data_dir} has mode {stat.S_IMODE(info.st_mode):o}: others can read "
                       "its secrets", f"`chmod 700 {data_dir}`")
    return Finding("data dir", True, f"{data_dir} (700, yours)")


def check_disk(settings: Settings) -> Finding:
    where = next(p for p in (settings.data_dir, *settings.data_dir.parents) if p.exists())
    free = shutil.disk_usage(where).free
    found = f"{free / (1 << 30):.1f} GiB free in {where}"
    if free < MIN_FREE_BYTES:
        return Finding("disk space", False, found, "free some space (at least 1 GiB) or set BATON_DATA_DIR")
    return Finding("disk space", True, found)


def run_checks(settings: Settings, environ: Mapping[str, str] = os.environ) -> list[Finding]:
    """Every check, in the order a new install meets them."""
    agents = check_agents(settings, environ)
    node = check_node(agents_installed=any("not installed" not in a.found for a in agents))
    checks = [check_git(), check_nats_server(), node, check_sandbox(settings), check_postgres(settings),
              *agents, check_nats_auth(settings), check_data_dir(settings), check_disk(settings)]
    return [finding for finding in checks if finding is not None]


def doctor(
    data_dir: Annotated[Optional[Path], typer.Option(help="where Baton keeps its data")] = None,
) -> None:
    """Check what this install needs (tools, agents, NATS auth, data dir, disk); say what to do."""
    settings = Settings(**({"data_dir": data_dir} if data_dir else {}))
    findings = run_checks(settings, _agent_environ(settings))
    console = Console(highlight=False, soft_wrap=True)
    for finding in findings:
        label, colour = ("ok", "green") if finding.ok else ("MISSING", "bold red") if finding.required \
            else ("advice", "yellow")
        console.print(f"[{colour}]{label:>7}[/]  {finding.name}: {finding.found}")
        if not finding.ok and finding.fix:
            console.print(f"{'':>9}→ {finding.fix}")
    blocking = [f.name for f in findings if f.blocks]
    if blocking:
        console.print(f"[bold red]Baton cannot run here until this is fixed: {', '.join(blocking)}[/]")
        raise typer.Exit(1)
    console.print("[bold green]Baton can run here.[/]")


def _agent_environ(settings: Settings) -> Mapping[str, str]:
    """Agents' credentials from the environment and, once the data dir exists, its secrets store."""
    if not (settings.data_dir / "secret").exists() and not settings.secret:
        return os.environ
    from services.runtime.agent_secrets import agent_environ

    try:
        return agent_environ(settings)
    except Exception:  # A store it cannot read: the environment is still worth checking.
        return os.environ


def _without_url(text: str, url: str) -> str:
    return text.replace(url, "BATON_DATABASE_URL")
