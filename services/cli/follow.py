"""Follow a task's flow live in the terminal until it ends."""

from __future__ import annotations

import time
from datetime import datetime

from rich.console import Console
from rich.markup import escape

from events import FLOW_CONTRACT, TERMINAL_TYPES
from services.cli.client import BatonClient

_OUTPUT_STYLE = {"stdout": "white", "stderr": "yellow", "message": "cyan", "tool": "magenta"}


def render_event(console: Console, event: dict, started: datetime) -> None:
    at = datetime.fromisoformat(event["occurred_at"])
    elapsed = f"+{(at - started).total_seconds():6.2f}s"
    data = event.get("data", {})
    kind = event["type"]
    if kind == "AgentOutput":
        style = _OUTPUT_STYLE.get(data.get("stream"), "white")
        console.print(f"[dim]{elapsed}[/]   [dim]│[/] [{style}]{escape(data['text'].rstrip())}[/]")
        return
    mark = "[green]✓[/]" if kind in FLOW_CONTRACT else "[red]✗[/]" if "Fail" in kind else "•"
    detail = {
        "WorkspaceReady": data.get("vm_agent_url"),
        "PromptDelivered": f"sha256 {data.get('prompt_sha256', '')[:12]}…",
        "AgentFinished": data.get("stop_reason"),
        "BranchPushed": f"{data.get('branch')} @ {str(data.get('commit'))[:10]}",
        "TaskCompleted": data.get("branch"),
    }.get(kind) or data.get("reason") or ""
    console.print(f"[dim]{elapsed}[/] {mark} [bold]{kind}[/] [dim]{escape(str(detail))}[/]")


def follow_task(client: BatonClient, task_id: str, console: Console, *, poll_s: float = 0.25) -> dict:
    """Print each event as it lands; returns the terminal event (TaskCompleted or TaskFailed)."""
    next_seq, started = 1, None
    while True:
        events = client.events(task_id, from_seq=next_seq)
        for event in events:
            started = started or datetime.fromisoformat(event["occurred_at"])
            render_event(console, event, started)
            next_seq = event["stream_seq"] + 1
            if event["type"] in TERMINAL_TYPES:
                return event
        if not events:
            time.sleep(poll_s)
