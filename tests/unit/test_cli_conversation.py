"""`baton watch`'s compact rendering of a real agent's turn."""

from __future__ import annotations

from datetime import datetime

from rich.console import Console

from services.cli.follow import render_event

AT = "2026-01-01T00:00:00+00:00"


def rendered(*events: tuple[str, dict]) -> list[str]:
    console = Console(width=200, record=True, color_system=None)
    pieces: dict[str, str] = {}
    for kind, data in events:
        render_event(console, {"type": kind, "occurred_at": AT, "data": data}, datetime.fromisoformat(AT), pieces)
    return [line.split("s ", 1)[1].strip() for line in console.export_text().splitlines()]


def test_a_turn_prints_thoughts_tool_calls_with_diff_sizes_plan_permissions_and_usage():
    lines = rendered(
        ("AgentOutput", {"seq": 1, "stream": "thought", "text": "Let me look\n"}),
        ("PlanUpdated", {"entries": [{"content": "Read", "status": "completed", "priority": "high"},
                                     {"content": "Write", "status": "in_progress", "priority": "high"}]}),
        ("ToolCallStarted", {"tool_call_id": "c1", "title": "Write a.txt", "kind": "edit", "status": "pending"}),
        ("PermissionRequested", {"request_id": "1", "tool_call_id": "c1", "title": "Write a.txt", "options": []}),
        ("PermissionAnswered", {"request_id": "1", "option_id": "once", "outcome": "selected", "by": "policy:auto"}),
        ("ToolCallUpdated", {"tool_call_id": "c1", "status": "completed", "output": "ok\n", "diffs": [
            {"path": "a.txt", "old_text": "one\ntwo\n", "new_text": "one\n2\nthree\n", "truncated": False}]}),
        ("UsageRecorded", {"source": "prompt_response", "input_tokens": 1000, "output_tokens": 234,
                           "cost_amount": 0.0123, "cost_currency": "USD"}),
    )
    assert lines == [
        "┆ Let me look", "plan", "✓ Read", "▸ Write",
        "⚙ Write a.txt edit pending",
        "? permission asked: Write a.txt", "answered option once by policy:auto",
        "⚙ Write a.txt completed", "✎ a.txt +2 -1", "ok",
        "Σ 1,000 in · 234 out tokens · 0.0123 USD",
    ]
