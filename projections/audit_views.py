"""Auditors' views over the audit log: one task's timeline, and every task with a gap."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from events import FLOW_CONTRACT, check_flow
from projections.audit_log import AuditLog

GAP_TYPES = ("StepOverdue", "StepRecovered", "AgentStalled")


def task_events(log: AuditLog, task_id: str) -> list[dict[str, Any]]:
    events, after = [], 0
    while page := log.query(task_id=task_id, after_seq=after, limit=1000):
        events += page
        after = page[-1]["stream_seq"]
    return events


def timeline(log: AuditLog, task_id: str) -> dict[str, Any] | None:
    """The task's handoffs (first occurrence, time, seconds since submission) and its gaps."""
    events = task_events(log, task_id)
    if not events:
        return None
    start = datetime.fromisoformat(events[0]["occurred_at"])
    first: dict[str, dict[str, Any]] = {}
    for event in events:
        first.setdefault(event["type"], event)
    handoffs = [
        {"step": step, "at": first[step]["occurred_at"], "stream_seq": first[step]["stream_seq"],
         "after_s": round((datetime.fromisoformat(first[step]["occurred_at"]) - start).total_seconds(), 3),
         "actor": first[step]["actor"]}
        for step in FLOW_CONTRACT if step in first
    ]
    report = check_flow(events)  # Envelopes: each turn's handoffs placed by the turn they carry.
    ended = next((e for e in reversed(events) if e["type"] in ("TaskCompleted", "TaskFailed", "TaskCancelled")), None)
    return {
        "task_id": task_id,
        "handoffs": handoffs,
        "missing": list(report.missing) if ended else [],
        "gaps": [{"type": e["type"], "at": e["occurred_at"], **e["data"]} for e in events if e["type"] in GAP_TYPES],
        "outcome": ended["type"] if ended else None,
        "reason": ended["data"].get("reason") if ended else None,
    }


def tasks_with_gaps(log: AuditLog, *, since: datetime | None, until: datetime | None) -> list[dict[str, Any]]:
    """Tasks with a late or missing handoff named in the range, or that ended with a hole in their flow."""
    flagged: dict[str, dict[str, Any]] = {}
    for gap_type in GAP_TYPES[::2]:  # StepOverdue and AgentStalled open gaps
        after = 0
        while page := log.query(type=gap_type, since=since, until=until, after_seq=after, limit=1000):
            for event in page:
                entry = flagged.setdefault(event["task_id"], {"task_id": event["task_id"], "gaps": []})
                entry["gaps"].append({"type": event["type"], "at": event["occurred_at"], **event["data"]})
            after = page[-1]["stream_seq"]
    after = 0
    while page := log.query(type="TaskCompleted", since=since, until=until, after_seq=after, limit=1000):
        for event in page:
            report = check_flow(task_events(log, event["task_id"]))
            if report.missing:
                entry = flagged.setdefault(event["task_id"], {"task_id": event["task_id"], "gaps": []})
                entry["gaps"] += [{"type": "Missing", "expected": step} for step in report.missing]
        after = page[-1]["stream_seq"]
    return sorted(flagged.values(), key=lambda t: t["gaps"][0].get("at", ""))
