"""A window of a task's history against a real nats-server: its newest events, pages before them,
its handoffs without its output, however the task's events are interleaved with others'."""

from __future__ import annotations

from events import STREAM, AgentOutput, TaskCompleted, WorkspaceReady, envelope_for
from events.catalog import EVENT_TYPES
from services.gateway.history import read_task_events, start_of_last
from services.runtime.bus import Bus

TASK, OTHER = "a" * 16, "b" * 16


async def publish_interleaved(bus: Bus, lines: int) -> list[tuple[int, str]]:
    """TASK's lines, OTHER's every second line between them, and a handoff every 100 lines of
    TASK; returns TASK's (stream_seq, type) in order."""
    mine = []
    for i in range(1, lines + 1):
        event = (WorkspaceReady(workspace_id=f"w{i}", provider="local", vm_agent_url="http://127.0.0.1:1") if i % 100 == 0
                 else AgentOutput(seq=i, stream="stdout", text=f"{i}\n"))
        for task_id in (TASK, OTHER) if i % 2 else (TASK,):
            envelope = envelope_for(event, task_id=task_id, actor="agent:shell")
            ack = await bus.js.publish(envelope.subject, envelope.to_json(), stream=STREAM)
            if task_id == TASK:
                mine.append((ack.seq, envelope.type))
    done = envelope_for(TaskCompleted(branch="b", commit="0" * 40), task_id=TASK, actor="service:task-runner")
    mine.append(((await bus.js.publish(done.subject, done.to_json(), stream=STREAM)).seq, done.type))
    return mine


async def test_the_newest_events_then_the_pages_before_them_are_the_whole_history_in_order(bus: Bus):
    mine = await publish_interleaved(bus, 1000)
    seqs = [seq for seq, _ in mine]

    newest = await read_task_events(bus.js, TASK, last=300)
    older = await read_task_events(bus.js, TASK, last=300, before_seq=newest[0]["stream_seq"])
    rest = await read_task_events(bus.js, TASK, before_seq=older[0]["stream_seq"])

    assert [e["stream_seq"] for e in newest] == seqs[-300:]
    assert [e["stream_seq"] for e in rest + older + newest] == seqs
    assert {e["task_id"] for e in rest + older + newest} == {TASK}


async def test_the_handoffs_before_a_window_come_without_the_output(bus: Bus):
    mine = await publish_interleaved(bus, 1000)
    window = await start_of_last(bus.js, f"baton.task.{TASK}.>", 50)

    handoffs = await read_task_events(bus.js, TASK, before_seq=window, exclude=frozenset({"AgentOutput"}))

    assert [(e["stream_seq"], e["type"]) for e in handoffs] == [
        (seq, kind) for seq, kind in mine if kind != "AgentOutput" and seq < window]
    assert len(handoffs) == 9  # WorkspaceReady at lines 100 … 900; line 1000's is in the window


async def test_asking_for_more_than_there_is_gives_all_of_it(bus: Bus):
    mine = await publish_interleaved(bus, 30)

    assert [e["stream_seq"] for e in await read_task_events(bus.js, TASK, last=10_000)] == [s for s, _ in mine]
    assert await start_of_last(bus.js, f"baton.task.{TASK}.>", 10_000) == 1
    assert await read_task_events(bus.js, TASK, exclude=frozenset(EVENT_TYPES)) == []
