"""Rebuilding the read models from scratch: the task board and the audit log, in-process.

Realistic envelopes are generated with `events.catalog` (`envelope_for`): tasks that go through
the whole flow with a few dozen lines of output each, some with a gap that recovers, some that
fail, interleaved the way concurrent tasks interleave on the stream. Each read model is then
fed the stream the way the projector feeds it (the board only its projected types, each
partition through its own consumer name; the audit log every event) into a fresh SQLite
database in a temp dir: in batches of `FETCH_BATCH` (one transaction each) when the read models
have batch methods, as the projector then does, else one transaction per event. Generation is
not timed.
"""

from __future__ import annotations

import random
import tempfile
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

from eventsourcing.persistence import Tracking

from events import (
    AgentFinished,
    AgentOutput,
    AgentSessionStarted,
    BranchPushed,
    Envelope,
    PromptDelivered,
    StepOverdue,
    StepRecovered,
    TaskCompleted,
    TaskFailed,
    TaskSubmitted,
    WorkspaceReady,
    WorkspaceRequested,
    envelope_for,
    partition_of,
)
from projections.audit_log import AuditLog
from projections.sql import SQLiteDatabase
from projections.task_board import PROJECTED_TYPES, TaskBoard
from services.runtime.consumer import FETCH_BATCH


def _task_events(rng: random.Random, n: int) -> list[Envelope]:
    task_id = f"{rng.getrandbits(64):016x}"
    repo = f"file:///srv/git/project-{n % 37}.git"
    prompt = f"Fix issue #{n}: " + " ".join(rng.choice(("the", "parser", "fails", "on", "empty", "input",
                                                              "add", "a", "test", "and", "docs"))
                                           for _ in range(30))
    session_id = f"{rng.getrandbits(128):032x}"
    out: list[Envelope] = []

    def emit(event: Any, actor: str) -> None:
        cause = out[-1].event_id if out else None
        out.append(envelope_for(event, task_id=task_id, actor=actor, causation_id=cause))

    emit(TaskSubmitted(repo=repo, prompt=prompt, agent="shell"), "user")
    emit(WorkspaceRequested(repo=repo, agent="shell"), "service:task-runner")
    emit(WorkspaceReady(workspace_id=f"local-{task_id}", provider="local",
                        vm_agent_url=f"http://127.0.0.1:{30000 + n % 20000}"), "service:provisioner")
    emit(AgentSessionStarted(session_id=session_id, agent="shell", attempt_id=f"{task_id}-a1"), "vm_agent")
    if rng.random() < 0.05:  # A late prompt: a named gap that recovers.
        emit(StepOverdue(expected="PromptDelivered", after="WorkspaceReady", waited_s=30.0), "service:monitor")
        emit(StepRecovered(expected="PromptDelivered", after="WorkspaceReady", waited_s=31.5), "service:monitor")
    emit(PromptDelivered(session_id=session_id, prompt_sha256=f"{rng.getrandbits(256):064x}"), "vm_agent")
    for seq in range(1, rng.randint(10, 50) + 1):
        text = f"{seq:06d} " + "".join(rng.choice("abcdefghij klmnop") for _ in range(rng.randint(40, 120))) + "\n"
        emit(AgentOutput(seq=seq, stream="stdout", text=text), "agent:shell")
    if rng.random() < 0.03:
        emit(AgentFinished(stop_reason="refusal", exit_code=1), "agent:shell")
        emit(TaskFailed(reason="agent stopped: refusal, exit code 1"), "service:task-runner")
    else:
        emit(AgentFinished(stop_reason="end_turn", exit_code=0), "agent:shell")
        commit = f"{rng.getrandbits(160):040x}"
        emit(BranchPushed(branch=f"baton/{task_id}", commit=commit), "vm_agent")
        emit(TaskCompleted(branch=f"baton/{task_id}", commit=commit), "service:task-runner")
    return out


def generate(total: int, *, seed: int = 7, concurrency: int = 8) -> list[Envelope]:
    """`total` envelopes of whole tasks, `concurrency` tasks interleaved at a time."""
    rng = random.Random(seed)
    stream: list[Envelope] = []
    running: list[list[Envelope]] = []
    n = 0
    while len(stream) < total:
        while len(running) < concurrency:
            running.append(_task_events(rng, n))
            n += 1
        lane = running[rng.randrange(len(running))]
        stream.append(lane.pop(0))
        if not lane:
            running.remove(lane)
    return stream


BATCH = FETCH_BATCH
"""The projector's consumers fetch up to this many messages at a time, and a backlog (which a
rebuild from scratch is) fills every fetch (services/runtime/consumer.py)."""


def _feed(items: list[tuple[Envelope, Tracking]], batch: Callable[[list[tuple[Envelope, Tracking]]], None] | None,
          one: Callable[[Envelope, Tracking], None]) -> None:
    """As the projector does: `batch` per fetched batch if the read model has it, else `one` each."""
    if batch is not None:
        for i in range(0, len(items), BATCH):
            batch(items[i:i + BATCH])
    else:
        for envelope, tracking in items:
            one(envelope, tracking)


def _board_rate(envelopes: list[Envelope], path: Path, *, batched: bool) -> tuple[int, float, int]:
    """(events applied, seconds, tasks on the board): each partition's consumer's events in
    order (`projector-p<k>`, as the projector reads them since issue 16; one per type before)."""
    board = TaskBoard(SQLiteDatabase(path))
    projected = set(PROJECTED_TYPES)
    by_consumer: dict[str, list[tuple[Envelope, Tracking]]] = {}
    for seq, envelope in enumerate(envelopes, 1):
        if envelope.type in projected:
            name = f"projector-p{partition_of(envelope.task_id)}"
            by_consumer.setdefault(name, []).append((envelope, Tracking(name, seq)))
    applied = sum(len(items) for items in by_consumer.values())
    started = time.perf_counter()
    for items in by_consumer.values():
        _feed(items, board.apply_batch if batched else None, board.apply)
    seconds = time.perf_counter() - started
    tasks = len(board.list(limit=1_000_000))
    board.close()
    return applied, seconds, tasks


def _audit_rate(envelopes: list[Envelope], path: Path, *, batched: bool) -> float:
    audit = AuditLog(SQLiteDatabase(path))
    items = [(e, Tracking("projector-all", seq)) for seq, e in enumerate(envelopes, 1)]
    started = time.perf_counter()
    _feed(items, audit.append_batch if batched else None, audit.append)
    seconds = time.perf_counter() - started
    audit.close()
    return seconds


def run(total: int, *, workdir: Path | None = None, per_event_max: int = 20_000) -> dict[str, Any]:
    """Events/second for each read model and combined, the way the projector feeds them.

    When the read models have batch methods (`apply_batch`, `append_batch`) the projector uses
    them with each fetch of up to 100 messages, and so does this; the one-event-at-a-time path
    (`apply`, `append`) is also measured, on the first `per_event_max` events.
    """
    envelopes = generate(total)
    batched = hasattr(TaskBoard, "apply_batch") and hasattr(AuditLog, "append_batch")
    out: dict[str, Any] = {"events": total, "mode": f"batches of {BATCH}" if batched else "one event at a time"}
    with tempfile.TemporaryDirectory(prefix="bench-projection-", dir=workdir) as tmp:
        board_events, board_s, tasks = _board_rate(envelopes, Path(tmp) / "board.sqlite", batched=batched)
        audit_s = _audit_rate(envelopes, Path(tmp) / "audit.sqlite", batched=batched)
        out |= {
            "tasks": tasks,
            "board_events": board_events,
            "board_s": board_s,
            "board_eps": board_events / board_s,
            "audit_s": audit_s,
            "audit_eps": total / audit_s,
            "combined_eps": total / (board_s + audit_s),
        }
        if batched:
            some = envelopes[:per_event_max]
            n, b_s, _ = _board_rate(some, Path(tmp) / "board1.sqlite", batched=False)
            a_s = _audit_rate(some, Path(tmp) / "audit1.sqlite", batched=False)
            out["per_event"] = {"events": len(some), "board_eps": n / b_s, "audit_eps": len(some) / a_s,
                                "combined_eps": len(some) / (b_s + a_s)}
    return out


if __name__ == "__main__":  # `python -m bench.projection [N]` for profiling this part alone.
    import json
    import sys

    print(json.dumps(run(int(sys.argv[1]) if len(sys.argv) > 1 else 20_000), indent=2))
