"""Benchmarks through the real system: HTTP in, the shell agent on the local provider, WebSockets out."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from datetime import datetime
from itertools import pairwise
from typing import Any

import httpx
import websockets

from bench import raw_nats
from bench.stack import (
    TERMINAL,
    BoardFeed,
    RssSampler,
    Stack,
    log,
    mem_available_mb,
    stream_last_seq,
)

LINE_BYTES = 100
"""Each output line is 100 bytes with its newline: an 8-digit counter, a space, 90 x's."""

TAIL_SLEEP_S = 5
"""The script sleeps after printing, so the shell agent's output readers are never cut off.

Without it the shell agent cancels readers still forwarding lines 2 s after bash exits
(`vm_agent/agents/shell.py`, `_drain`), and up to the last ~1300 lines are lost (see
docs/benchmarks.md). The sleep is outside every measured window.
"""


def printing_prompt(lines: int, tail_sleep_s: int = TAIL_SLEEP_S) -> str:
    script = f'seq -f "%08g {"x" * (LINE_BYTES - 10)}" 1 {lines}\n'
    return script + (f"sleep {tail_sleep_s}\n" if tail_sleep_s else "")


def _when(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["occurred_at"]).timestamp()


async def _submit(client: httpx.AsyncClient, stack: Stack, prompt: str, *, agent: str = "shell") -> tuple[str, float]:
    """POST /api/tasks; returns the task id and the wall-clock time the request was sent."""
    assert stack.origin is not None
    sent_at = time.time()
    response = await client.post(f"{stack.api}/api/tasks",
                                 json={"repo": stack.origin.as_uri(), "prompt": prompt, "agent": agent})
    if response.status_code != 201:
        raise RuntimeError(f"POST /api/tasks: {response.status_code} {response.text[:300]}")
    return response.json()["task_id"], sent_at


# -- output: one vm_agent to one WebSocket viewer ---------------------------------------------


async def output_throughput(stack: Stack, lines: int, *, timeout_s: float,
                            tail_sleep_s: int = TAIL_SLEEP_S) -> dict[str, Any]:
    """A shell task prints `lines` lines as fast as it can; one viewer follows it live.

    Rate = stdout AgentOutput events / (viewer's receipt of the first → of the last).
    """
    async with httpx.AsyncClient(timeout=30, headers=stack.auth) as client:
        task_id, sent_at = await _submit(client, stack, printing_prompt(lines, tail_sleep_s))
    url = f"{stack.ws}/api/tasks/{task_id}/stream?from_seq=1"
    count = 0
    first_at = last_at = 0.0
    first_event = last_event = None
    types: dict[str, int] = {}
    terminal = None
    envelope_bytes = 0
    async with asyncio.timeout(timeout_s):
        async with websockets.connect(url, max_size=None, open_timeout=10, additional_headers=stack.auth) as socket:
            async for raw in socket:
                event = json.loads(raw)
                kind = event["type"]
                types[kind] = types.get(kind, 0) + 1
                if kind == "AgentOutput" and event["data"]["stream"] == "stdout":
                    now = time.perf_counter()
                    count += 1
                    if count == 1:
                        first_at, first_event = now, event
                        stored = {k: v for k, v in event.items() if k != "stream_seq"}
                        envelope_bytes = len(json.dumps(stored, separators=(",", ":")).encode())
                    last_at, last_event = now, event
                elif kind in TERMINAL:
                    terminal = event
                    break
    if count < 2 or first_event is None or last_event is None:
        raise RuntimeError(f"task {task_id}: only {count} stdout lines arrived; types {types}")
    lost = lines - count
    viewer_s = last_at - first_at
    recorded_s = _when(last_event) - _when(first_event)
    return {
        "task_id": task_id,
        "lines": lines,
        "received": count,
        "lost": lost,
        "events": sum(types.values()),
        "types": types,
        "outcome": terminal["type"] if terminal else None,
        "reason": (terminal or {}).get("data", {}).get("reason"),
        "envelope_bytes": envelope_bytes,
        "viewer_s": viewer_s,
        "rate": count / viewer_s,
        # When the vm_agent recorded them (occurred_at): how fast the producer side went.
        "recorded_rate": count / recorded_s if recorded_s > 0 else None,
        "submit_to_first_output_s": _when(first_event) - sent_at,
    }


# -- replay: a late viewer -----------------------------------------------------------------


async def publish_replay_task(stack: Stack, events: int, *, line_bytes: int = LINE_BYTES,
                              task_id: str | None = None, first_seq: int = 1, finished: bool = True) -> str:
    """A finished task of `events` events put straight on BATON_EVENTS, the way a relay publishes.

    `events - 1` AgentOutput envelopes shaped like the shell agent's (100-byte lines), then
    TaskCompleted. No type any service acts on (no TaskSubmitted, no WorkspaceRequested), so
    nothing else runs; the monitor and the projector just read it. With `finished=False`: `events`
    AgentOutput (seq from `first_seq`) and no TaskCompleted, onto `task_id` (a running task's) if given.
    """
    import nats

    from events import AgentOutput, TaskCompleted, envelope_for

    assert stack.nats is not None
    task_id = task_id or f"{int(time.time() * 1e6) & (2**64 - 1):016x}"
    cause = f"{task_id}{'0' * 16}"
    lines = events - 1 if finished else events
    envelopes = [
        envelope_for(AgentOutput(seq=i, stream="stdout", text=f"{i:08d} {'x' * (line_bytes - 10)}\n"),
                     task_id=task_id, actor="agent:shell", causation_id=cause)
        for i in range(first_seq, first_seq + lines)
    ]
    if finished:
        envelopes.append(envelope_for(TaskCompleted(branch=f"baton/{task_id}", commit="0" * 40),
                                      task_id=task_id, actor="service:task-runner", causation_id=cause))
    nc = await nats.connect(stack.nats.url, name="bench-replay-publisher")
    try:
        js = nc.jetstream()
        futures = [await js.publish_async(e.subject, e.to_json(), stream="BATON_EVENTS",
                                          headers={"Nats-Msg-Id": e.event_id}) for e in envelopes]
        await asyncio.gather(*futures)
    finally:
        await nc.close()
    return task_id



async def ws_replay(stack: Stack, task_id: str, *, timeout_s: float, batch: bool) -> dict[str, Any]:
    """A viewer arriving after the end: from_seq=1 until the terminal event.

    `batch`: as the web UI and `baton watch` read (`&batch=1`, a JSON array per message);
    otherwise one event per message (the default for other clients)."""
    url = f"{stack.ws}/api/tasks/{task_id}/stream?from_seq=1" + ("&batch=1" if batch else "")
    count = 0
    started = time.perf_counter()
    async with asyncio.timeout(timeout_s):
        async with websockets.connect(url, max_size=None, open_timeout=10, additional_headers=stack.auth) as socket:
            async for raw in socket:
                # Cheap check first; parse only the candidates (a viewer's own cost stays small).
                ending = '"TaskCompleted"' in raw or '"TaskFailed"' in raw
                if batch:
                    events = json.loads(raw)
                    count += len(events)
                    if ending and any(e["type"] in TERMINAL for e in events):
                        break
                else:
                    count += 1
                    if ending and json.loads(raw)["type"] in TERMINAL:
                        break
    elapsed = time.perf_counter() - started
    return {"events": count, "seconds": elapsed, "rate": count / elapsed}


async def replay(stack: Stack, task_id: str, events: int, *, rounds: int, timeout_s: float) -> dict[str, Any]:
    """Best of `rounds` for each WebSocket mode and for plain nats-py, alternating."""
    assert stack.nats is not None
    runs: dict[str, list[dict[str, Any]]] = {"batch": [], "single": []}
    raw_runs: list[dict[str, float]] = []
    for _ in range(rounds):
        raw_runs.append(await raw_nats.replay(stack.nats.url, f"baton.task.{task_id}.>", events,
                                              timeout_s=timeout_s))
        runs["batch"].append(await ws_replay(stack, task_id, timeout_s=timeout_s, batch=True))
        runs["single"].append(await ws_replay(stack, task_id, timeout_s=timeout_s, batch=False))
    best = {mode: max(mode_runs, key=lambda r: r["rate"]) for mode, mode_runs in runs.items()}
    for mode, run in best.items():
        if run["events"] != events:
            raise RuntimeError(f"WebSocket replay ({mode}) got {run['events']} events, the stream has {events}")
    return {
        "events": events,
        "ws_rate": best["batch"]["rate"],
        "ws_seconds": best["batch"]["seconds"],
        "ws_rates": [r["rate"] for r in runs["batch"]],
        "ws_single_rate": best["single"]["rate"],
        "ws_single_rates": [r["rate"] for r in runs["single"]],
        "raw_ordered_rate": max(r["ordered"] for r in raw_runs),
        "raw_pull256_rate": max(r["pull256"] for r in raw_runs),
    }


# -- submit → PromptDelivered ----------------------------------------------------------------


STAGES = ("TaskSubmitted", "WorkspaceRequested", "WorkspaceReady", "AgentSessionStarted", "PromptDelivered")


def _percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def submit_to_prompt(stack: Stack, tasks: int, *, concurrency: int, timeout_s: float,
                           until_end: bool = False, agent: str = "shell") -> dict[str, Any]:
    """`tasks` tasks for `agent`, at most `concurrency` between POST and PromptDelivered at any time
    (with `until_end`, between POST and the task's terminal event: that many tasks in flight)."""
    assert stack.nats is not None
    from_seq = await stream_last_seq(stack.nats.url) + 1
    latencies: list[float] = []     # PromptDelivered.occurred_at - POST sent (wall clock)
    observed: list[float] = []      # PromptDelivered seen on the board feed - POST sent
    stage_gaps: dict[str, list[float]] = {s: [] for s in STAGES[1:]}
    missing: list[str] = []
    task_ids: list[str] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(tasks):
        queue.put_nowait(i)
    deadline = time.monotonic() + timeout_s

    async with BoardFeed(stack, from_seq) as feed, httpx.AsyncClient(timeout=30, headers=stack.auth) as client:
        async def worker() -> None:
            while not queue.empty() and time.monotonic() < deadline:
                i = queue.get_nowait()
                task_id, sent_at = await _submit(client, stack, f"echo {i} > bench.txt\n", agent=agent)
                task_ids.append(task_id)
                seen = await feed.wait_for(task_id, ("PromptDelivered", *TERMINAL),
                                           timeout_s=max(deadline - time.monotonic(), 0))
                if seen is None or "PromptDelivered" not in seen.events:
                    missing.append(task_id)
                    continue
                latencies.append(_when(seen.events["PromptDelivered"]) - sent_at)
                observed.append(seen.received_at["PromptDelivered"] - sent_at)
                for before, after in pairwise(STAGES):
                    if before in seen.events and after in seen.events:
                        stage_gaps[after].append(_when(seen.events[after]) - _when(seen.events[before]))
                if until_end:
                    await feed.wait_for(task_id, TERMINAL, timeout_s=max(deadline - time.monotonic(), 0))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        # Let every task finish before the next benchmark (their vm_agents linger briefly).
        outcomes = await _wait_all(feed, task_ids, deadline)
    if not latencies:
        raise RuntimeError(f"no PromptDelivered seen for any of {len(task_ids)} tasks")
    return {
        "tasks": len(task_ids),
        "concurrency": concurrency,
        "until_end": until_end,
        "p50_ms": 1000 * _percentile(latencies, 50),
        "p99_ms": 1000 * _percentile(latencies, 99),
        "max_ms": 1000 * max(latencies),
        "observed_p50_ms": 1000 * _percentile(observed, 50),
        "observed_p99_ms": 1000 * _percentile(observed, 99),
        "stage_p50_ms": {f"{b}->{a}": 1000 * statistics.median(stage_gaps[a])
                         for b, a in pairwise(STAGES) if stage_gaps[a]},
        "missing_prompt": len(missing),
        "outcomes": outcomes,
        "feed_drops": feed.drops[:5],
    }


async def _wait_all(feed: BoardFeed, task_ids: list[str], deadline: float) -> dict[str, int]:
    outcomes: dict[str, int] = {}
    for task_id in task_ids:
        seen = await feed.wait_for(task_id, TERMINAL, timeout_s=max(deadline - time.monotonic(), 0))
        outcome = (seen.terminal() if seen else None) or "unfinished"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    return outcomes


# -- many tasks at once ----------------------------------------------------------------------


MIN_MEM_AVAILABLE_MB = 1500
"""Give up (and say so) rather than push the machine into the OOM killer."""


async def concurrent_tasks(stack: Stack, tasks: int, sampler: RssSampler, *, timeout_s: float) -> dict[str, Any]:
    """`tasks` tasks submitted at once; time from the first POST to the last TaskCompleted seen."""
    assert stack.nats is not None
    from_seq = await stream_last_seq(stack.nats.url) + 1
    limits = httpx.Limits(max_connections=tasks, max_keepalive_connections=tasks)
    async with BoardFeed(stack, from_seq) as feed, httpx.AsyncClient(timeout=120, limits=limits,
                                                                     headers=stack.auth) as client:
        sampler.phase = "concurrent"
        started = time.time()
        submitted = await asyncio.gather(
            *(_submit(client, stack, f"echo {i} > bench.txt\n") for i in range(tasks)),
            return_exceptions=True,
        )
        task_ids = [s[0] for s in submitted if isinstance(s, tuple)]
        post_errors = [repr(s) for s in submitted if not isinstance(s, tuple)]
        submit_s = time.time() - started
        log(f"concurrent: {len(task_ids)} submitted in {submit_s:.1f}s")
        deadline = time.monotonic() + timeout_s
        aborted = None
        while time.monotonic() < deadline:
            ended = sum(1 for t in task_ids if feed.tasks[t].terminal())
            if ended == len(task_ids) or feed.error is not None:
                break
            if mem_available_mb() < MIN_MEM_AVAILABLE_MB:
                aborted = f"MemAvailable fell below {MIN_MEM_AVAILABLE_MB} MB"
                break
            await asyncio.sleep(0.2)
        sampler.phase = "after-concurrent"
    ends = [feed.tasks[t].received_at[feed.tasks[t].terminal()] for t in task_ids if feed.tasks[t].terminal()]
    outcomes: dict[str, int] = {}
    reasons: dict[str, int] = {}
    for t in task_ids:
        outcome = feed.tasks[t].terminal() or "unfinished"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if outcome == "TaskFailed":
            reason = feed.tasks[t].events["TaskFailed"]["data"]["reason"][:120]
            reasons[reason] = reasons.get(reason, 0) + 1
    prompt_latency = [
        _when(feed.tasks[t].events["PromptDelivered"]) - started
        for t in task_ids if "PromptDelivered" in feed.tasks[t].events
    ]
    return {
        "tasks": tasks,
        "submitted": len(task_ids),
        "post_errors": post_errors[:3],
        "submit_s": submit_s,
        "seconds": (max(ends) - started) if ends and len(ends) == len(task_ids) else None,
        "last_end_s": (max(ends) - started) if ends else None,
        "outcomes": outcomes,
        "failure_reasons": reasons,
        "prompt_p50_s": statistics.median(prompt_latency) if prompt_latency else None,
        "gateway_peak_rss_mb": sampler.peak["concurrent"],
        "rss_samples": sampler.samples["concurrent"],
        "min_mem_available_mb": sampler.min_mem_available_mb,
        "aborted": aborted,
        "feed_error": repr(feed.error) if feed.error else None,
        "feed_drops": feed.drops[:5],
        "gateway_restarts": sampler.gateway_restarts,
    }
