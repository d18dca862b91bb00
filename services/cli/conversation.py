"""A real agent's turn in `baton watch`/`baton submit`, compactly: tool calls with their status and
diff sizes, the plan, permissions and usage (`events/catalog.py`), one or a few lines each."""

from __future__ import annotations

import difflib

from rich.markup import escape

CONVERSATION_TYPES = frozenset({"ToolCallStarted", "ToolCallUpdated", "PlanUpdated", "UsageRecorded",
                                "PermissionRequested", "PermissionAnswered"})
_STATUS_STYLE = {"pending": "dim", "in_progress": "yellow", "completed": "green", "failed": "red"}
_PLAN_MARK = {"completed": "[green]✓[/]", "in_progress": "[yellow]▸[/]", "pending": "[dim]○[/]"}
_OUTPUT_TAIL_LINES = 3


def conversation_lines(kind: str, data: dict, titles: dict[str, str]) -> list[str]:
    """Rich markup lines for one conversation event; `titles` remembers each tool call's title."""
    if kind in ("ToolCallStarted", "ToolCallUpdated"):
        return _tool_call(data, titles)
    if kind == "PlanUpdated":
        return ["[bold]plan[/]", *(f"  {_PLAN_MARK.get(e['status'], '○')} {escape(e['content'])}" for e in data["entries"])]
    if kind == "UsageRecorded":
        return [f"[dim]Σ {usage_text(data)}[/]"] if usage_text(data) else []
    if kind == "PermissionRequested":
        return [f"[dim]? permission asked: {escape(data['title'])}[/]"]
    if kind == "PermissionAnswered":
        answer = f"option {data['option_id']}" if data["outcome"] == "selected" else "cancelled"
        reason = f": {data['reason']}" if data.get("reason") else ""
        return [f"[dim]  answered {escape(answer)} by {escape(data['by'])}{escape(reason)}[/]"]
    return []


def usage_text(data: dict) -> str:
    """'1,000 in · 234 out tokens · context 1,200/200,000 · 0.0123 USD', as far as reported."""
    parts = []
    if data.get("input_tokens") is not None or data.get("output_tokens") is not None:
        parts.append(f"{data.get('input_tokens') or 0:,} in · {data.get('output_tokens') or 0:,} out tokens")
    if data.get("context_used") is not None:
        parts.append(f"context {data['context_used']:,}/{data.get('context_size') or 0:,}")
    if data.get("cost_amount") is not None:
        parts.append(f"{data['cost_amount']:.4f} {data.get('cost_currency') or ''}".strip())
    return " · ".join(parts)


def _tool_call(data: dict, titles: dict[str, str]) -> list[str]:
    call_id = data["tool_call_id"]
    if data.get("title"):
        titles[call_id] = data["title"]
    status = data.get("status") or "updated"
    kind = f" [dim]{escape(data['kind'])}[/]" if data.get("kind") else ""
    style = _STATUS_STYLE.get(status, "white")
    lines = [f"[magenta]⚙[/] {escape(titles.get(call_id, call_id))}{kind} [{style}]{escape(status)}[/]"]
    for diff in data.get("diffs") or []:
        added, removed = diff_size(diff.get("old_text"), diff["new_text"])
        cut = " [dim](cut)[/]" if diff.get("truncated") else ""
        lines.append(f"    [cyan]✎ {escape(diff['path'])}[/] [green]+{added}[/] [red]-{removed}[/]{cut}")
    output = (data.get("output") or "").rstrip()
    if output and status in ("completed", "failed"):
        lines += [f"    [dim]{escape(line)}[/]" for line in output.splitlines()[-_OUTPUT_TAIL_LINES:]]
    return lines


def diff_size(old: str | None, new: str) -> tuple[int, int]:
    """Lines added and removed from `old` (None: a new file) to `new`."""
    added = removed = 0
    for line in difflib.unified_diff((old or "").splitlines(), new.splitlines(), lineterm="", n=0):
        if line.startswith("+") and not line.startswith("+++"):
            added += 1
        elif line.startswith("-") and not line.startswith("---"):
            removed += 1
    return added, removed
