"""Live WebSocket streams: history then the live tail, from any sequence, no gap, no duplicate."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import websockets

from events import TERMINAL_TYPES
from tests.support.api import Api
from tests.support.invariants import counting_prompt
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability


async def collect_until_end(api: Api, path: str, *, timeout_s: float = 120) -> list[dict]:
    """Every message of one viewer of `path` until the task's terminal event."""
    received: list[dict] = []
    async with asyncio.timeout(timeout_s):
        async with api.stream(path, max_size=None) as socket:
            async for raw in socket:
                received.append(json.loads(raw))
                if received[-1]["type"] in TERMINAL_TYPES:
                    return received
    raise AssertionError("stream closed before the task ended")


def key(events: list[dict]) -> list[tuple[int, str]]:
    return [(e["stream_seq"], e["event_id"]) for e in events]


def submit_counting(api: Api, origin: Path, lines: int, pause_s: float = 0.05) -> str:
    prompt = counting_prompt(secrets.token_hex(4), lines, pause_s=pause_s)
    return api.submit(repo=origin.as_uri(), prompt=prompt, agent="shell")["task_id"]


def test_a_viewer_joining_mid_run_gets_the_whole_history_then_the_live_tail(stack, api, origin):
    task_id = submit_counting(api, origin, 60)
    wait_for(lambda: any(e["type"] == "AgentOutput" for e in api.events(task_id)),
             timeout_s=60, what="the run to be under way")

    received = asyncio.run(collect_until_end(api, f"/api/tasks/{task_id}/stream"))

    # Exactly the stream's history of the task, in order: nothing missing, nothing twice.
    assert key(received) == key(api.events(task_id))
    assert received[0]["type"] == "TaskSubmitted" and received[-1]["type"] == "TaskCompleted"
    assert [e["stream_seq"] for e in received] == sorted({e["stream_seq"] for e in received})


def test_a_viewer_resuming_from_a_sequence_gets_exactly_the_rest(stack, api, origin):
    task_id = submit_counting(api, origin, 20, pause_s=0.02)
    history = api.wait_for_end(task_id)
    resume_at = history[len(history) // 2]["stream_seq"]

    received = asyncio.run(
        collect_until_end(api, f"/api/tasks/{task_id}/stream?from_seq={resume_at}")
    )

    assert key(received) == key([e for e in history if e["stream_seq"] >= resume_at])


def test_two_hundred_viewers_of_one_running_task_all_get_the_full_identical_sequence(stack, api, origin):
    task_id = submit_counting(api, origin, 100, pause_s=0.02)
    path = f"/api/tasks/{task_id}/stream"

    async def viewers() -> list[list[dict]]:
        return await asyncio.gather(*(collect_until_end(api, path, timeout_s=240) for _ in range(200)))

    everyone = asyncio.run(viewers())

    expected = key(api.events(task_id))
    assert sum(1 for e in expected) > 100
    assert all(key(seen) == expected for seen in everyone)


def test_the_board_feed_carries_every_task_without_output_when_asked(stack, api, origin):
    async def watch_board(task_ids: list[str]) -> list[dict]:
        seen: list[dict] = []
        async with asyncio.timeout(120), api.stream("/api/stream?exclude=AgentOutput") as socket:
            async for raw in socket:
                event = json.loads(raw)
                seen.append(event)
                if task_ids and event["task_id"] == task_ids[0] and event["type"] in TERMINAL_TYPES:
                    return seen
        return seen

    task_id = submit_counting(api, origin, 5, pause_s=0.01)
    seen = asyncio.run(watch_board([task_id]))

    mine = [e["type"] for e in seen if e["task_id"] == task_id]
    assert mine[0] == "TaskSubmitted" and mine[-1] == "TaskCompleted"
    assert "AgentOutput" not in {e["type"] for e in seen}
    assert [e["stream_seq"] for e in seen] == sorted(e["stream_seq"] for e in seen)


def test_a_bad_from_seq_is_refused(api):
    async def connect() -> None:
        async with api.stream("/api/stream?from_seq=0") as socket:
            await socket.recv()

    with pytest.raises((websockets.InvalidStatus, websockets.ConnectionClosedError)):
        asyncio.run(connect())


def test_baton_watch_replays_from_a_sequence_and_exits_with_the_outcome(stack, api, origin):
    task_id = submit_counting(api, origin, 5, pause_s=0.01)
    history = api.wait_for_end(task_id)
    env = {**os.environ, "BATON_API": stack.api, "BATON_API_TOKEN": stack.token, "COLUMNS": "200"}
    later = history[3]["stream_seq"]

    done = subprocess.run([sys.executable, "-m", "services.cli.main", "watch", task_id, "--from", str(later)],
                          env=env, capture_output=True, text=True, timeout=120)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "TaskCompleted" in done.stdout and "TaskSubmitted" not in done.stdout


def test_a_slow_viewer_is_back_pressured_never_dropped(stack, api, origin):
    task_id = submit_counting(api, origin, 400, pause_s=0)

    async def slow_viewer() -> list[dict]:
        received: list[dict] = []
        async with asyncio.timeout(180), api.stream(f"/api/tasks/{task_id}/stream", max_queue=1) as socket:
            async for raw in socket:
                received.append(json.loads(raw))
                await asyncio.sleep(0.005)  # Reads far slower than the agent writes.
                if received[-1]["type"] in TERMINAL_TYPES:
                    return received
        raise AssertionError("stream closed before the task ended")

    received = asyncio.run(slow_viewer())

    assert key(received) == key(api.events(task_id))


async def collect_batched_until_end(api: Api, path: str, *, timeout_s: float = 120) -> list[dict]:
    """Every event of one `batch=1` viewer (each message a JSON array) until the terminal event."""
    received: list[dict] = []
    async with asyncio.timeout(timeout_s):
        async with api.stream(path, max_size=None) as socket:
            async for raw in socket:
                batch = json.loads(raw)
                assert isinstance(batch, list) and batch, raw[:200]
                received.extend(batch)
                if received[-1]["type"] in TERMINAL_TYPES:
                    return received
    raise AssertionError("stream closed before the task ended")


def test_a_batched_viewer_gets_the_same_sequence_in_arrays_and_resumes_the_same_way(stack, api, origin):
    task_id = submit_counting(api, origin, 40, pause_s=0.02)
    wait_for(lambda: any(e["type"] == "AgentOutput" for e in api.events(task_id)),
             timeout_s=60, what="the run to be under way")
    path = f"/api/tasks/{task_id}/stream"

    # Joining mid-run: the history, then the live tail, each event once, in order.
    live = asyncio.run(collect_batched_until_end(api, f"{path}?batch=1"))
    history = api.events(task_id)
    assert key(live) == key(history)

    # A late viewer of the finished task: the same events.
    late = asyncio.run(collect_batched_until_end(api, f"{path}?from_seq=1&batch=1"))
    assert key(late) == key(history)

    resume_at = history[len(history) // 2]["stream_seq"]
    rest = asyncio.run(collect_batched_until_end(api, f"{path}?from_seq={resume_at}&batch=1"))
    assert key(rest) == key([e for e in history if e["stream_seq"] >= resume_at])


def test_the_board_feed_excludes_types_in_batches_too(stack, api, origin):
    task_id = submit_counting(api, origin, 5, pause_s=0.01)
    api.wait_for_end(task_id)

    async def watch_board() -> list[dict]:
        seen: list[dict] = []
        path = "/api/stream?from_seq=1&exclude=AgentOutput&batch=1"
        async with asyncio.timeout(120), api.stream(path, max_size=None) as socket:
            async for raw in socket:
                seen.extend(json.loads(raw))
                if any(e["task_id"] == task_id and e["type"] in TERMINAL_TYPES for e in seen):
                    return seen
        return seen

    seen = asyncio.run(watch_board())
    mine = [e for e in seen if e["task_id"] == task_id]
    expected = [e for e in api.events(task_id) if e["type"] != "AgentOutput"]
    assert key(mine) == key(expected)
    assert "AgentOutput" not in {e["type"] for e in seen}
    assert [e["stream_seq"] for e in seen] == sorted({e["stream_seq"] for e in seen})


def test_a_late_viewer_reads_a_tasks_newest_events_first_then_pages_back(stack, api, origin):
    # Two tasks at once, so each one's events are interleaved with the other's on the stream.
    task_ids = [submit_counting(api, origin, 40, pause_s=0.01) for _ in range(2)]
    events = [api.wait_for_end(task_id) for task_id in task_ids][0]

    def read(**params: object) -> list[dict]:
        response = api.http.get(f"/api/tasks/{task_ids[0]}/events", params=params)
        assert response.status_code == 200, response.text
        return response.json()["events"]

    # The newest 10, then the 10 before them, then the rest: exactly the history, in order.
    newest = read(last=10)
    older = read(last=10, before_seq=newest[0]["stream_seq"])
    rest = read(before_seq=older[0]["stream_seq"])
    assert len(newest) == len(older) == 10
    assert key(rest + older + newest) == key(events)
    # Everything but the output before a position (JetStream leaves the output out).
    handoffs = read(exclude="AgentOutput", before_seq=newest[0]["stream_seq"])
    assert key(handoffs) == key([e for e in events if e["type"] != "AgentOutput"
                                 and e["stream_seq"] < newest[0]["stream_seq"]])
    # Asking for more than there is gives all of it.
    assert key(read(last=10_000)) == key(events)

    # The task's stream can start at its 10th newest event, as the task page opens.
    path = f"/api/tasks/{task_ids[0]}/stream?last=10&batch=1"
    assert key(asyncio.run(collect_batched_until_end(api, path))) == key(newest)
