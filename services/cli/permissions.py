"""`baton permissions [TASK_ID]` lists the permission requests waiting for you;
`baton permissions answer TASK_ID REQUEST_ID OPTION_ID` answers one (tasks submitted with
`--permissions ask`)."""

from __future__ import annotations

from typing import Annotated, Optional

import httpx
import typer
from rich.console import Console
from rich.markup import escape

from events.envelope import task_id_problem
from services.cli.client import ApiError, BatonClient, TokenOption, find_api_token

USAGE = "baton permissions [TASK_ID]  |  baton permissions answer TASK_ID REQUEST_ID OPTION_ID"


def permissions(
    words: Annotated[Optional[list[str]], typer.Argument(metavar="[TASK_ID | answer TASK_ID REQUEST_ID OPTION_ID]",
                                                         show_default=False)] = None,
    api: Annotated[str, typer.Option("--api", envvar="BATON_API", help="Baton's HTTP API")] = "http://127.0.0.1:8420",
    token: TokenOption = None,
) -> None:
    """The permission requests waiting for a person (of one task, or of every task), or answer one."""
    console = Console(highlight=False, soft_wrap=True)
    words = words or []
    client = BatonClient(api, find_api_token(token))
    try:
        if words[:1] == ["answer"] and len(words) == 4:
            task_id, request_id, option_id = (_task_id(words[1]), words[2], words[3])
            client.answer_permission(task_id, request_id, option_id)
            console.print(f"answered permission {escape(request_id)} of {task_id}: {escape(option_id)}")
        elif len(words) <= 1:
            task_ids = [_task_id(words[0])] if words else [
                task["task_id"] for task in client.tasks() if task.get("waiting_for") == "person"]
            _print_open(console, client, task_ids)
        else:
            raise typer.BadParameter(f"expected {USAGE}")
    except (ApiError, httpx.HTTPError) as error:
        console.print(f"[bold red]error:[/] {escape(str(error))}")
        raise typer.Exit(2) from None


def _task_id(value: str) -> str:
    if (problem := task_id_problem(value)) is not None:
        raise typer.BadParameter(problem)
    return value


def _print_open(console: Console, client: BatonClient, task_ids: list[str]) -> None:
    """One line per open request (whole, never wrapped: scripts read it too)."""
    shown = 0
    for task_id in task_ids:
        for request in client.permissions(task_id):
            if request["answer"] is None:
                options = ", ".join(f"{o['option_id']} ({o['kind']})" for o in request["options"])
                console.print(f"{task_id}  request [bold]{escape(request['request_id'])}[/]: "
                              f"{escape(request['title'])}  options: {escape(options)}")
                shown += 1
    if shown:
        console.print("answer with: baton permissions answer TASK_ID REQUEST_ID OPTION_ID")
    else:
        console.print("no permission request is waiting for you")
