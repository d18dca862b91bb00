"""`baton audit`: query, export and verify the whole event history."""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import httpx
import nats.errors
import typer
from nats.js.errors import NotFoundError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from events import STREAM
from projections.audit_verify import (
    compare_with_stores,
    compare_with_stream,
    verify_chain,
)
from services.projector.audit_sources import (
    AUDIT_CONSUMER,
    relayed_envelopes,
    stream_history,
)
from services.cli.client import ApiToken, TokenOption, find_api_token
from services.projector.read_models import open_audit_log
from services.runtime.bus import connect_nats
from services.runtime.nats_auth import service_credentials
from services.runtime.settings import Settings

audit_app = typer.Typer(help="Query, export and verify the event history (for auditors).",
                        no_args_is_help=True)
console = Console(highlight=False, soft_wrap=True)

ApiOption = Annotated[str, typer.Option("--api", envvar="BATON_API", help="Baton's HTTP API")]
DEFAULT_API = "http://127.0.0.1:8420"
DataDirOption = Annotated[Optional[Path], typer.Option(help="Baton's data dir (or BATON_DATA_DIR)")]
NatsOption = Annotated[Optional[str], typer.Option(help="NATS URL (or BATON_NATS_URL)")]
NATS_CONNECT_TIMEOUT_S = 5.0


def _get(api: str, token: ApiToken, path: str, params: dict) -> dict:
    response = httpx.get(f"{api.rstrip('/')}{path}", params={k: v for k, v in params.items() if v},
                         headers=token.headers, timeout=60)
    _exit_if_refused(response, token)
    if response.is_error:
        console.print(f"[bold red]error:[/] {response.status_code}: {response.json().get('detail')}")
        raise typer.Exit(2)
    return response.json()


def _exit_if_refused(response: httpx.Response, token: ApiToken) -> None:
    if response.status_code == 401:
        console.print(f"[bold red]error:[/] {token.refused()}")
        raise typer.Exit(2)


def _all_events(api: str, token: ApiToken, filters: dict) -> Iterator[dict]:
    cursor = None
    while True:
        page = _get(api, token, "/api/audit/events", {**filters, "limit": 1000, "cursor": cursor})
        yield from page["events"]
        if not (cursor := page["next_cursor"]):
            return


@audit_app.command()
def events(
    task: Annotated[Optional[str], typer.Option(help="only this task")] = None,
    type: Annotated[Optional[str], typer.Option(help="only this event type")] = None,
    actor: Annotated[Optional[str], typer.Option(help="only events by this actor")] = None,
    since: Annotated[Optional[str], typer.Option(help="ISO-8601 with timezone")] = None,
    until: Annotated[Optional[str], typer.Option(help="ISO-8601 with timezone")] = None,
    format: Annotated[str, typer.Option(help="table, json, ndjson or csv")] = "table",
    api: ApiOption = DEFAULT_API,
    token: TokenOption = None,
) -> None:
    """Events in stream order, filtered (filters combine)."""
    if format not in ("table", "json", "ndjson", "csv"):
        raise typer.BadParameter("format must be table, json, ndjson or csv")
    found = _all_events(api, find_api_token(token), {"task_id": task, "type": type, "actor": actor, "since": since, "until": until})
    if format == "ndjson":
        for event in found:
            print(json.dumps(event))
    elif format == "json":
        print(json.dumps(list(found), indent=2))
    elif format == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["stream_seq", "occurred_at", "task_id", "type", "actor", "event_id", "causation_id", "data"])
        for e in found:
            writer.writerow([e["stream_seq"], e["occurred_at"], e["task_id"], e["type"], e["actor"],
                             e["event_id"], e["causation_id"] or "", json.dumps(e["data"])])
    else:
        table = Table("seq", "time", "task", "type", "actor", "caused by")
        for e in found:
            table.add_row(str(e["stream_seq"]), e["occurred_at"], e["task_id"], e["type"], e["actor"],
                          (e["causation_id"] or "")[:12])
        console.print(table)


@audit_app.command()
def export(
    task: Annotated[Optional[str], typer.Option(help="only this task")] = None,
    since: Annotated[Optional[str], typer.Option()] = None,
    until: Annotated[Optional[str], typer.Option()] = None,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = None,
) -> None:
    """The history as NDJSON on stdout, streamed (for very large histories)."""
    params = {k: v for k, v in {"task_id": task, "since": since, "until": until}.items() if v}
    found = find_api_token(token)
    with httpx.stream("GET", f"{api.rstrip('/')}/api/audit/export", params=params, headers=found.headers,
                      timeout=None) as response:
        _exit_if_refused(response, found)
        if response.is_error:
            console.print(f"[bold red]error:[/] {response.status_code}: {response.read().decode()}")
            raise typer.Exit(2)
        for chunk in response.iter_bytes():
            sys.stdout.buffer.write(chunk)
    sys.stdout.flush()


@audit_app.command()
def gaps(
    since: Annotated[Optional[str], typer.Option()] = None,
    until: Annotated[Optional[str], typer.Option()] = None,
    api: ApiOption = DEFAULT_API,
    token: TokenOption = None,
) -> None:
    """Tasks whose flow had a missing or late handoff."""
    tasks = _get(api, find_api_token(token), "/api/audit/gaps", {"since": since, "until": until})["tasks"]
    table = Table("task", "gaps")
    for task in tasks:
        table.add_row(task["task_id"], "; ".join(
            f"{g['type']} {g.get('expected', 'AgentOutput')}"
            + (f" after {g['after']} ({g['waited_s']}s)" if "after" in g else "")
            for g in task["gaps"]))
    console.print(table if tasks else "no task had a gap")


def _settings(data_dir: Path | None, nats_url: str | None) -> Settings:
    overrides = {k: v for k, v in {"data_dir": data_dir, "nats_url": nats_url}.items() if v}
    return Settings(**overrides)


async def _stream(settings: Settings) -> list:
    nc = await connect_nats(settings.nats_url, name="baton-audit", timeout_s=NATS_CONNECT_TIMEOUT_S,
                            credentials=service_credentials(settings, "auditor"))
    try:
        return await stream_history(nc.jetstream())
    finally:
        await nc.close()


def _history(settings: Settings) -> list:
    """The stream's whole history, or one line saying where it looked and what to pass (exit 2)."""
    for chatty in ("nats", "services.runtime.bus"):  # a line per failed connect attempt
        logging.getLogger(chatty).setLevel(logging.CRITICAL)
    try:
        return asyncio.run(_stream(settings))
    except TimeoutError:
        _cannot_audit(settings, f"no NATS answered within {NATS_CONNECT_TIMEOUT_S:.0f} s")
    except NotFoundError:
        _cannot_audit(settings, f"NATS has no stream {STREAM}")
    except (ConnectionError, OSError, nats.errors.Error) as error:
        _cannot_audit(settings, str(error) or type(error).__name__)


def _require_data_dir(settings: Settings, *, with_audit_log: bool) -> None:
    """Refuse a data dir that is not one `baton up` used (opening the log there would create it)."""
    if settings.database_url:
        return
    if not settings.data_dir.is_dir():
        _cannot_audit(settings, "the data dir does not exist")
    if with_audit_log and not (settings.data_dir / "projections" / "audit_log.sqlite").is_file():
        _cannot_audit(settings, "the data dir has no audit log (projections/audit_log.sqlite)")


def _cannot_audit(settings: Settings, problem: str) -> NoReturn:
    looked = f"data dir {settings.data_dir}, NATS {settings.nats_url}, stream {STREAM}"
    console.print(f"[bold red]error:[/] {escape(problem)} (looked at: {escape(looked)}); pass --nats-url "
                  "and --data-dir (or BATON_NATS_URL, BATON_DATA_DIR) of the `baton up` to audit")
    raise typer.Exit(2)


@audit_app.command()
def verify(data_dir: DataDirOption = None, nats_url: NatsOption = None) -> None:
    """Recompute the hash chain and cross-check the log with the stream and every store."""
    settings = _settings(data_dir, nats_url)
    _require_data_dir(settings, with_audit_log=True)
    log = open_audit_log(settings)
    records, chain = verify_chain(log)
    streamed, against_stream = compare_with_stream(log, _history(settings))
    stored, against_stores = compare_with_stores(log, relayed_envelopes(settings))
    findings = chain + against_stream + against_stores
    for finding in findings:
        console.print(f"[bold red]✗[/] {finding}")
    if findings:
        console.print(f"[bold red]{len(findings)} problem(s)[/] in {records} audit records")
        raise typer.Exit(1)
    console.print(f"[green]✓[/] {records} audit records: hash chain intact; identical to the stream "
                  f"({streamed} events) and to the producers' stores ({stored} events)")


@audit_app.command()
def rebuild(data_dir: DataDirOption = None, nats_url: NatsOption = None) -> None:
    """Drop the audit log and rebuild it from the stream (the result is identical)."""
    settings = _settings(data_dir, nats_url)
    _require_data_dir(settings, with_audit_log=False)
    history = _history(settings)
    log = open_audit_log(settings)
    count = log.rebuild(iter(history), consumer=AUDIT_CONSUMER)
    console.print(f"rebuilt the audit log from the stream: {count} events")
