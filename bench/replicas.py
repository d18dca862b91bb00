"""Many tasks at once on `baton up --replicas N` (issue 16).

The concurrent benchmark (`pipeline.concurrent_tasks`) again, on a stack of its own whose every
service runs N times (`BATON_REPLICA=i/N`; each service's replicas share its SQLite store and
its partitioned consumers): the tasks are POSTed to gateway 0 and followed on its board feed, the
gateway's memory is gateway 0's. The stack is stopped before this returns.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench import pipeline
from bench.stack import RssSampler, Stack, log


async def concurrent_on_replicas(root: Path, *, replicas: int, tasks: int,
                                 settle: Callable[[Stack], Awaitable[float]],
                                 timeout_s: Callable[[], float]) -> dict[str, Any]:
    """`tasks` tasks at once on N replicas of every service; `settle` waits for a warm pool,
    `timeout_s()` is what the run may still take once settled."""
    stack = Stack(root, replicas=replicas)
    sampler: RssSampler | None = None
    try:
        starting = time.monotonic()
        stack.start()
        start_s = time.monotonic() - starting
        log(f"baton up --replicas {replicas} healthy in {start_s:.1f}s at {stack.api}")
        sampler = RssSampler(stack).start()
        await settle(stack)
        result = await pipeline.concurrent_tasks(stack, tasks, sampler, timeout_s=timeout_s())
        return result | {"replicas": replicas, "stack_start_s": start_s}
    finally:
        if sampler is not None:
            sampler.stop()
        stopping = time.monotonic()
        stack.stop()
        log(f"replicas stack stopped in {time.monotonic() - stopping:.1f}s"
            + (f"; {stack.still_running} STILL RUNNING" if stack.still_running else ""))
