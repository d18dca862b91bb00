"""`baton`: run the stack (`up`), submit and follow tasks, read their events."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import httpx
import typer
from rich.console import Console
from rich.table import Table

from services.cli.agents import agents_app, secrets_app
from services.cli.audit import audit_app
from services.cli.doctor import doctor
from services.cli.handlers import handlers
from services.cli.credentials import credentials_app
from services.cli.client import ApiError, ApiToken, BatonClient, TokenOption, find_api_token
from services.cli.follow import follow_task, render_event
from services.cli.nats_config import nats_config
from services.cli.permissions import permissions
from services.cli.service import run_service
from services.cli.supervisor import SERVICE_NAMES, Supervisor, SupervisorError
from events.asyncapi import asyncapi_document
from events.envelope import task_id_problem
from services.runtime.logs import mask_credentials
from services.runtime.nats_auth import InstallAuth, install_auth_dir
from services.runtime.settings import Settings
from vm_agent.sandbox import Sandbox

app = typer.Typer(
    help="Baton: run AI coding agents on tasks.", no_args_is_help=True, pretty_exceptions_enable=False
)
console = Console(highlight=False, soft_wrap=True)

app.add_typer(audit_app, name="audit")
app.add_typer(credentials_app, name="credentials")
app.add_typer(agents_app, name="agents")
app.add_typer(secrets_app, name="secrets")
app.command("nats-config")(nats_config)
app.command("doctor")(doctor)
app.command("permissions")(permissions)
app.command("handlers")(handlers)


@app.callback()
def _private_files() -> None:
    """Everything a Baton process creates (stores, logs, secrets, workspaces) is its owner's only."""
    os.umask(0o077)

ApiOption = Annotated[
    str, typer.Option("--api", envvar="BATON_API", help="Baton's HTTP API (or set BATON_API)")
]
DEFAULT_API = "http://127.0.0.1:8420"


def _check_task_id(value: str) -> str:
    if (problem := task_id_problem(value)) is not None:
        raise typer.BadParameter(problem)
    return value


TaskIdArgument = Annotated[str, typer.Argument(callback=_check_task_id, metavar="TASK_ID",
                                                help="the id `baton submit` printed")]


DEMO_PROMPT = 'echo "Hello from Baton" > hello.txt\necho "wrote hello.txt in $(pwd)"'


@app.command()
def service(name: Annotated[str, typer.Argument(help=", ".join(SERVICE_NAMES))]) -> None:
    """Run one service in the foreground (`baton up` runs each this way)."""
    run_service(name)


@app.command()
def up(
    port: Annotated[int, typer.Option(help="the gateway's HTTP port")] = 8420,
    data_dir: Annotated[Optional[Path], typer.Option(help="where Baton keeps its data")] = None,
    nats_url: Annotated[Optional[str], typer.Option(help=(
        "use this NATS (JetStream on) instead of starting one; a cluster: its servers' URLs, comma-separated"))] = None,
    demo: Annotated[bool, typer.Option(help="submit a demo task once the stack is up")] = False,
    replicas: Annotated[int, typer.Option(min=1, max=16, help=(
        "processes of each service (BATON_REPLICA=i/N; gateways on consecutive ports from --port); "
        "they share each service's store: SQLite here, PostgreSQL with BATON_DATABASE_URL"))] = 1,
) -> None:
    """Start NATS (unless --nats-url) and every service; restart any that dies; Ctrl-C stops all."""
    overrides = {"port": port} | ({"data_dir": data_dir} if data_dir else {})
    settings = Settings(**overrides)
    supervisor = Supervisor(settings, nats_url=nats_url, say=lambda m: console.print(f"[yellow]{m}[/]"),
                            replicas=replicas)

    def interrupt(_signum: int, _frame: object) -> None:
        # The first Ctrl-C (or SIGTERM) stops Baton; further ones must not cut the stop short.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    api = _local_api(settings)
    token = ApiToken(settings.api_token_value(), "BATON_API_TOKEN" if settings.api_token else "the data dir")
    try:
        supervisor.start()
        console.print(f"[dim]data: {settings.data_dir}  nats: {mask_credentials(supervisor.nats_url)}[/]")
        if supervisor.bus_open is False:
            console.print("[dim]bus: authenticated (each service and each workspace has its own NATS credential)[/]"
                          if InstallAuth.exists_in(install_auth_dir(settings)) else
                          "[dim]bus: authenticated with the credentials configured (--nats-url's user or token, "
                          "or BATON_NATS_CREDS), shared by every service and vm_agent[/]")
        if settings.faults:
            console.print(f"[bold red]FAULT INJECTION ON: {', '.join(sorted(settings.faults))}[/]")
        _say_sandbox(settings)
        _wait_healthy(supervisor, api)
        console.print(f"[bold green]Baton is up:[/] {api}   (Ctrl-C stops it)")
        if replicas > 1:
            gateways = [_local_api(settings.model_copy(update={"port": port + i})) for i in range(replicas)]
            console.print(f"{replicas} replicas of each service; gateways: {'  '.join(gateways)}")
        _print_login(api, settings, token)
        if demo:
            _run_demo(BatonClient(api, token), settings)
        while True:
            supervisor.check()
            time.sleep(0.2)
    except (SupervisorError, ApiError) as error:  # ApiError: the demo's gateway refused it
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        console.print("stopping…")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        supervisor.stop()


def _say_sandbox(settings: Settings) -> None:
    """How agents will be confined; loudly when they will not be."""
    sandbox = Sandbox.from_setting(settings.sandbox, hidden=(settings.data_dir,))
    if sandbox.mode == "bwrap":
        console.print("[dim]agents: sandboxed with bwrap (their workspace and home writable, "
                      "the data dir hidden, an allowlisted environment)[/]")
        return
    console.print(f"[bold red]NO AGENT SANDBOX: {sandbox.describe()}.[/] Install bubblewrap "
                  "(apt-get install bubblewrap) so agents cannot read the data dir's secrets.")


def _wait_healthy(supervisor: Supervisor, api: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        supervisor.check()
        try:
            if httpx.get(f"{api}/api/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SupervisorError(f"Baton did not become healthy within {timeout_s:.0f}s; "
                          f"see the logs in {supervisor.settings.data_dir / 'logs'}")


def _local_api(settings: Settings) -> str:
    """The gateway's URL from this machine (a wildcard bind is reached on 127.0.0.1)."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    return f"http://{f'[{host}]' if ':' in host else host}:{settings.port}"


def _print_login(api: str, settings: Settings, token: ApiToken) -> None:
    """The login URL (as Jupyter prints one): opening it gives the browser its session cookie."""
    console.print(f"Open the web UI (this URL logs you in): {api}/?token={token.value}")
    if not settings.api_token:
        console.print(f"[dim]The API token is in {settings.data_dir / 'api-token'}; the CLI reads it "
                      "from there (BATON_DATA_DIR) or from BATON_API_TOKEN.[/]")


def _run_demo(client: BatonClient, settings: Settings) -> None:
    origin = settings.data_dir / "demo" / "origin.git"
    if not origin.exists():
        _make_demo_repo(origin)
    console.print(f"[bold]demo:[/] submitting a shell task on {origin}")
    task = client.submit(repo=origin.as_uri(), prompt=DEMO_PROMPT, agent="shell", base_branch=None)
    _follow_and_report(client, task["task_id"])


def _make_demo_repo(origin: Path) -> None:
    origin.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "--quiet", "--bare", "--initial-branch=main", str(origin)], check=True)
    with tempfile.TemporaryDirectory() as work:
        run = lambda *a: subprocess.run(["git", *a], cwd=work, check=True, capture_output=True)  # noqa: E731
        run("clone", "--quiet", str(origin), ".")
        Path(work, "README.md").write_text("# Baton demo repository\n")
        run("add", "README.md")
        run("-c", "user.name=Baton", "-c", "user.email=baton@localhost", "commit", "-m", "initial commit")
        run("push", "--quiet", "origin", "HEAD:refs/heads/main")


def _follow_and_report(client: BatonClient, task_id: str, *, from_seq: int = 1) -> bool:
    console.print(f"task [bold]{task_id}[/]")
    end = asyncio.run(follow_task(client.api, task_id, console, token=client.token, from_seq=from_seq))
    if end["type"] == "TaskCompleted":
        console.print(f"[bold green]completed[/]: branch {end['data']['branch']} "
                      f"at {end['data']['commit'][:10]}")
        return True
    if end["type"] == "TaskCancelled":
        console.print(f"[bold yellow]cancelled[/] by {end['data']['by']}"
                      + (f": {end['data']['reason']}" if end["data"].get("reason") else ""))
        return False
    console.print(f"[bold red]failed[/]: {end['data']['reason']}")
    return False


@app.command()
def submit(
    prompt: Annotated[str, typer.Argument(help="the agent's first prompt")],
    repo: Annotated[str, typer.Option(help="git URL or path of the repository")],
    agent: Annotated[str, typer.Option(help="an agent from GET /api/backends")] = "shell",
    base_branch: Annotated[Optional[str], typer.Option(help="branch to start from")] = None,
    permission_policy: Annotated[str, typer.Option(
        "--permissions", help="auto: the agent's permission requests are allowed once; ask: you answer "
                              "each (baton permissions)")] = "auto",
    provider: Annotated[Optional[str], typer.Option(
        help="where its workspace runs: local or hetzner (default: the install's BATON_PROVIDER)")] = None,
    pr: Annotated[bool, typer.Option(
        "--pr/--no-pr", help="open a GitHub pull request once pushed (where a token is configured)")] = True,
    draft: Annotated[bool, typer.Option(help="open the pull request as a draft")] = False,
    follow: Annotated[bool, typer.Option(help="follow the task live until it ends")] = True,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = None,
) -> None:
    """Submit a task, print its id, and follow it to the end (exit code 1 if it fails)."""
    client = BatonClient(api, find_api_token(token))
    try:
        task = client.submit(repo=repo, prompt=prompt, agent=agent, base_branch=base_branch,
                             permission_policy=permission_policy, provider=provider,
                             pull_request=pr, draft=draft)
        if not follow:
            console.print(task["task_id"])
            return
        ok = _follow_and_report(client, task["task_id"])
    except (ApiError, httpx.HTTPError, ConnectionError) as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(2) from None
    raise typer.Exit(0 if ok else 1)


@app.command()
def watch(
    task_id: TaskIdArgument,
    from_seq: Annotated[int, typer.Option("--from", min=1, help="start at this stream sequence")] = 1,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = None,
) -> None:
    """Watch a task live (history first, from any sequence); exit code 1 if it failed."""
    try:
        ok = _follow_and_report(BatonClient(api, find_api_token(token)), task_id, from_seq=from_seq)
    except ConnectionError as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(2) from None
    raise typer.Exit(0 if ok else 1)


@app.command()
def tasks(api: ApiOption = DEFAULT_API, token: TokenOption = None) -> None:
    """The task board (a task waiting for a place shows its place in line: `queued #2`)."""
    table = Table("task", "state", "agent", "repo", "branch / reason", "gaps", "cost")
    colours = {"completed": "green", "failed": "red", "running": "cyan", "provisioning": "blue",
               "cancelled": "yellow"}
    try:
        board = BatonClient(api, find_api_token(token)).tasks()
    except (ApiError, httpx.HTTPError) as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(2) from None
    for task in board:
        colour = colours.get(task["state"], "white")
        gaps = " ".join(
            f"[{'yellow' if g['recovered'] else 'bold red'}]⚠ {g['expected']} {g['waited_s']:.0f}s"
            f"{' (late)' if g['recovered'] else ''}[/]"
            for g in task.get("gaps", [])
        )
        state = task["state"] + (f" #{task['queue_position']}" if task.get("queue_position") else "")
        state += " (waiting for you: baton permissions)" if task.get("waiting_for") == "person" else ""
        cost = f"€{task['cost_eur']:.4f}" if task.get("cost_eur") is not None else ""
        table.add_row(task["task_id"], f"[{colour}]{state}[/]", task["agent"] or "",
                      task["repo"] or "", task["branch"] or task["reason"] or "", gaps, cost)
    console.print(table)


@app.command()
def notifications(
    task_id: Annotated[Optional[str], typer.Option("--task", help="only this task's")] = None,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = None,
) -> None:
    """Webhook notifications delivered or given up, newest first (endpoint, event, attempts, reason)."""
    found = find_api_token(token)
    try:
        response = httpx.get(f"{api.rstrip('/')}/api/notifications", headers=found.headers, timeout=30,
                             params={"task_id": task_id} if task_id else None)
    except httpx.HTTPError as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(2) from None
    if response.status_code != 200:
        detail = found.refused() if response.status_code == 401 else f"{response.status_code}: {response.text}"
        console.print(f"[bold red]error:[/] {detail}")
        raise typer.Exit(2)
    table = Table("at", "task", "event", "endpoint", "outcome", "attempts", "delivery id / reason")
    for item in response.json()["notifications"]:
        outcome = "[green]delivered[/]" if item["outcome"] == "delivered" else "[bold red]failed[/]"
        table.add_row(item["at"], item["task_id"], item["event_type"], item["endpoint"], outcome,
                      str(item["attempts"]), item["reason"] or item["delivery_id"])
    console.print(table)


@app.command()
def cancel(
    task_id: TaskIdArgument,
    reason: Annotated[Optional[str], typer.Option(help="why (kept with the cancel)")] = None,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = None,
) -> None:
    """Cancel a task: a queued one never starts, a running agent is stopped; nothing more is pushed."""
    try:
        BatonClient(api, find_api_token(token)).cancel(task_id, reason=reason)
    except (ApiError, httpx.HTTPError) as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(2 if "409" not in str(error) else 1) from None
    console.print(f"task [bold]{task_id}[/]: cancel recorded; it ends [yellow]cancelled[/] within seconds")


@app.command()
def say(
    task_id: TaskIdArgument,
    prompt: Annotated[str, typer.Argument(help="the follow-up prompt: the agent's next turn")],
    api: ApiOption = DEFAULT_API,
    token: TokenOption = None,
) -> None:
    """Send a follow-up to a task's agent: it runs as the next turn of the same session (after the
    running turn is pushed), and its work is pushed to the task's branch as a commit of its own."""
    try:
        BatonClient(api, find_api_token(token)).say(task_id, prompt)
    except (ApiError, httpx.HTTPError) as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(2 if "409" not in str(error) else 1) from None
    console.print(f"task [bold]{task_id}[/]: follow-up recorded; it runs as the agent's next turn")


def _check_task_id_or_schema(value: str) -> str:
    return value if value == "schema" else _check_task_id(value)


@app.command()
def events(
    task_id: Annotated[str, typer.Argument(callback=_check_task_id_or_schema, metavar="TASK_ID|schema",
                                           help="the id `baton submit` printed, or `schema`")],
    api: ApiOption = DEFAULT_API,
    json_lines: Annotated[bool, typer.Option("--json", help="one JSON envelope per line")] = False,
    token: TokenOption = None,
) -> None:
    """A task's events, from the stream, in order; `baton events schema`: the event contract
    (AsyncAPI 3, JSON) other services code against, as GET /api/events/asyncapi.json serves it."""
    if task_id == "schema":
        print(json.dumps(asyncapi_document(), indent=2))
        return
    try:
        history = BatonClient(api, find_api_token(token)).events(task_id)
    except (ApiError, httpx.HTTPError) as error:
        console.print(f"[bold red]error:[/] {error}")
        raise typer.Exit(2) from None
    pieces: dict[str, str] = {}
    for event in history:
        if json_lines:
            print(json.dumps(event))
        else:
            render_event(console, event, datetime.fromisoformat(history[0]["occurred_at"]), pieces)


if __name__ == "__main__":
    app()
