"""Follow a task's flow live in the terminal until it ends."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime

import websockets
from rich.console import Console
from rich.markup import escape

from events import FLOW_CONTRACT, TERMINAL_TYPES
from services.cli.client import ApiToken
from services.cli.conversation import CONVERSATION_TYPES, conversation_lines

_OUTPUT_STYLE = {"stdout": "white", "stderr": "yellow", "message": "cyan", "thought": "dim italic",
                 "tool": "magenta"}


def render_event(console: Console, event: dict, started: datetime, pieces: dict[str, str] | None = None) -> None:
    """Print one event. `pieces` (one dict per task followed) holds the start of a line whose
    AgentOutputs are marked `continues`, so the line prints once, whole (and the titles of tool calls)."""
    at = datetime.fromisoformat(event["occurred_at"])
    elapsed = f"+{(at - started).total_seconds():6.2f}s"
    data = event.get("data", {})
    kind = event["type"]
    if kind == "AgentOutput":
        stream, text = data.get("stream", ""), data["text"]
        if pieces is not None:
            text = pieces.pop(stream, "") + text
            if data.get("continues"):
                pieces[stream] = text
                return
        style = _OUTPUT_STYLE.get(stream, "white")
        mark = "[dim]┆[/]" if stream == "thought" else "[dim]│[/]"
        console.print(f"[dim]{elapsed}[/]   {mark} [{style}]{escape(text.rstrip())}[/]")
        return
    if kind in CONVERSATION_TYPES:
        for line in conversation_lines(kind, data, pieces if pieces is not None else {}):
            console.print(f"[dim]{elapsed}[/]   {line}")
        return
    mark = "[green]✓[/]" if kind in FLOW_CONTRACT else "[red]✗[/]" if "Fail" in kind else "•"
    detail = {
        "WorkspaceReady": data.get("vm_agent_url"),
        "PromptDelivered": f"sha256 {data.get('prompt_sha256', '')[:12]}…",
        "AgentFinished": data.get("stop_reason"),
        "BranchPushed": f"{data.get('branch')} @ {str(data.get('commit'))[:10]}",
        "TaskCompleted": data.get("branch"),
        "TaskCancelled": f"by {data.get('by')}" + (f": {data['reason']}" if data.get("reason") else "")
                         + (f" (pushed before: {data.get('branch')})" if data.get("pushed") else " (nothing pushed)"),
        "TaskQueued": f"waiting for a place: #{data.get('position')} in line "
                      f"({data.get('max_running')} tasks run at once)",
    }.get(kind) or data.get("reason") or ""
    console.print(f"[dim]{elapsed}[/] {mark} [bold]{kind}[/] [dim]{escape(str(detail))}[/]")


def stream_url(api: str, task_id: str, from_seq: int) -> str:
    base = api.rstrip("/").replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    # batch=1: each message is a JSON array of events (a long history comes in far fewer messages).
    return f"{base}/api/tasks/{task_id}/stream?from_seq={from_seq}&batch=1"


async def follow_task(
    api: str, task_id: str, console: Console, *, token: ApiToken, from_seq: int = 1,
    give_up_after_s: float = 60.0,
) -> dict:
    """Render the task's events from `from_seq` as they land, over the WebSocket stream.

    Reconnects after a dropped connection from the last sequence seen + 1 (no gap, no
    duplicate). Returns the terminal event (TaskCompleted or TaskFailed). A refused token or
    stream (4xx) ends it at once with ConnectionError.
    """
    next_seq, started, failing_since = from_seq, None, None
    pieces: dict[str, str] = {}
    while True:
        try:
            url = stream_url(api, task_id, next_seq)
            async with websockets.connect(url, additional_headers=token.headers) as socket:
                failing_since = None
                async for raw in socket:
                    for event in json.loads(raw):
                        started = started or datetime.fromisoformat(event["occurred_at"])
                        render_event(console, event, started, pieces)
                        next_seq = event["stream_seq"] + 1
                        if event["type"] in TERMINAL_TYPES:
                            return event
        except (OSError, websockets.ConnectionClosed, websockets.InvalidHandshake) as error:
            if isinstance(error, websockets.InvalidStatus):
                _raise_if_refused(error, token, task_id)
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > give_up_after_s:
                raise ConnectionError(f"lost the stream of task {task_id}: {error}") from error
            await asyncio.sleep(0.5)


def _raise_if_refused(error: websockets.InvalidStatus, token: ApiToken, task_id: str) -> None:
    """A 4xx handshake will be refused again: say why (the token, or the gateway's `detail`) at once."""
    status = error.response.status_code
    if status == 401:
        raise ConnectionError(token.refused()) from None
    if 400 <= status < 500:
        try:
            reason = str(json.loads(error.response.body)["detail"])
        except (TypeError, ValueError, KeyError):
            reason = f"HTTP {status}"
        raise ConnectionError(f"the stream of task {task_id} was refused: {reason}") from None
