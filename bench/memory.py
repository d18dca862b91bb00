"""Memory per running task, and the most tasks one 24 GB machine runs at once (issue 17).

`tasks` tasks whose prompt keeps running (the shell agent runs `sleep`; a Claude task runs its
turn against the fake model server), submitted at once. Once every one has `PromptDelivered`:
PSS (`/proc/<pid>/smaps_rollup`; each task at the largest of 6 readings 0.5 s apart, as a real
agent's tree grows and shrinks with the tools it runs) of each task's vm_agent
(`<data_dir>/vm_agents/<task>/pid`) and of every process under it (the agent: for the shell
agent bwrap and its python, which runs the prompt; for Claude the Node adapter and the CLI it
runs); of the warm pool's idle members (`vm_agents/pool*/`); and of the fixed cost: `baton up`,
its services (`run/*.pid`) with their own children (the vm_agent zygote), and nats-server. PSS
splits each shared page among the processes sharing it, so the sum over every process is what
the machine holds; USS (private pages) is what one more task adds.

    max_tasks_24gb = floor((24 GiB × (1 − HEADROOM) − fixed − idle pool) / per-task total PSS p90)

HEADROOM is 10 % for the kernel and the page cache. Shared pages are split more ways as tasks
are added, so a per-task PSS read at N over-states it at larger N: the extrapolation errs low.
Memory is not the first bound: BATON_MAX_RUNNING_TASKS (default max(2, min(4 per CPU, 1 per GiB
free))) holds tasks beyond it `queued`, whatever memory is left.

    .venv/bin/python -m bench.memory [--tasks 10,20,40] [--agent shell|claude]

Prints a table per N to stderr, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import secrets
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from bench import pipeline, procfs
from bench.agents import fake_models, stack_with
from bench.stack import TERMINAL, BoardFeed, Stack, log, mem_available_mb, stream_last_seq, wait_until_pool_warm
from services.runtime.settings import default_max_running_tasks
from tests.support.agents import install_agents

MACHINE_GIB = 24
HEADROOM = 0.10
ENDED = ("TaskCancelled", *TERMINAL)
READINGS, READING_EVERY_S = 6, 0.5
HOLD_S = 900
"""The shell task's `sleep`: longer than any run; the tasks are cancelled once read."""


def _parents() -> dict[int, int]:
    """Every live process's parent."""
    return {pid: found.ppid for pid in procfs.pids() if (found := procfs.stat(pid)) is not None and found.alive}


def _tree(root: int, children: dict[int, list[int]]) -> list[int]:
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, ()))
    return found


def _pss_uss_kb(pid: int) -> tuple[int, int]:
    """(PSS, USS) of a process in kB; (0, 0) if it is gone."""
    values = {}
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
            name, _, rest = line.partition(":")
            values[name] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        return 0, 0
    return values.get("Pss", 0), values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)


def _mb(pids: list[int]) -> tuple[float, float]:
    pss, uss = zip(*(_pss_uss_kb(pid) for pid in pids), strict=True) if pids else ((0,), (0,))
    return sum(pss) / 1024, sum(uss) / 1024


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds the processes have used so far."""
    return sum(found.cpu_s for pid in pids if (found := procfs.stat(pid)) is not None)


def _pid_in(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def read_memory(stack: Stack, task_ids: list[str]) -> dict[str, Any]:
    """One reading of every process the stack runs, split into tasks, idle pool and fixed cost."""
    assert stack.baton is not None and stack.baton.process is not None
    assert stack.nats is not None and stack.nats.process is not None
    parents = _parents()
    children: dict[int, list[int]] = defaultdict(list)
    for pid, parent in parents.items():
        children[parent].append(pid)
    vm_agents = stack.data_dir / "vm_agents"
    tasks = {}
    for task_id in task_ids:
        pid = _pid_in(vm_agents / task_id / "pid")
        if pid in parents:
            agent = _tree(pid, children)[1:]
            vm_mb, vm_uss = _mb([pid])
            agent_mb, agent_uss = _mb(agent)
            tasks[task_id] = {"vm_agent_mb": vm_mb, "agent_tree_mb": agent_mb, "total_mb": vm_mb + agent_mb,
                              "total_uss_mb": vm_uss + agent_uss, "processes": [procfs.comm(p) for p in (pid, *agent)],
                              "cpu_s": _cpu_s([pid, *agent]),
                              "cpu_s_by_process": {f"{i}:{procfs.comm(p)}": round(_cpu_s([p]), 2)
                                                   for i, p in enumerate((pid, *agent))}}
    pool = [pid for f in vm_agents.glob("pool*/*/pid") if (pid := _pid_in(f)) in parents]
    pool_mb = [_mb(_tree(pid, children))[0] for pid in pool]
    # Every vm_agent (ours, the pool's, any other still lingering) is a task's cost, not a fixed one.
    vm_agent_pids = {p for f in vm_agents.glob("*/pid") if (pid := _pid_in(f)) in parents
                     for p in _tree(pid, children)}
    vm_agent_pids |= {p for pid in pool for p in _tree(pid, children)}
    roots = {"baton up": stack.baton.process.pid, "nats-server": stack.nats.process.pid}
    roots |= {f.stem: pid for f in sorted((stack.data_dir / "run").glob("*.pid")) if (pid := _pid_in(f))}
    fixed: dict[str, float] = {}
    counted: set[int] = set()
    for name in sorted(roots, key=lambda n: n == "baton up"):  # `baton up` last: its own process only.
        pids = [p for p in _tree(roots[name], children) if p not in vm_agent_pids and p not in counted]
        counted.update(pids)
        fixed[name] = round(_mb(pids)[0], 1)
    return {"tasks": tasks, "pool_member_mb": pool_mb, "fixed_mb": fixed}


async def peak_reading(stack: Stack, task_ids: list[str]) -> dict[str, Any]:
    """READINGS readings READING_EVERY_S apart; each task's as it was at its largest (a real
    agent's tree changes size as its turn runs tools), the pool and the fixed cost as last read."""
    reading = read_memory(stack, task_ids)
    largest = dict(reading["tasks"])
    for _ in range(READINGS - 1):
        await asyncio.sleep(READING_EVERY_S)
        reading = read_memory(stack, task_ids)
        for task_id, task in reading["tasks"].items():
            if task["total_mb"] > largest.get(task_id, {"total_mb": 0})["total_mb"]:
                largest[task_id] = task
    return {**reading, "tasks": largest}


def _spread(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50": round(statistics.median(ordered), 1), "p90": round(pipeline._percentile(ordered, 90), 1),
            "max": round(ordered[-1], 1)}


def max_tasks(fixed_mb: float, pool_mb: float, per_task_mb: float) -> int:
    """The formula of the module's docstring."""
    budget_mb = MACHINE_GIB * 1024 * (1 - HEADROOM) - fixed_mb - pool_mb
    return max(0, math.floor(budget_mb / per_task_mb))


async def memory_per_task(stack: Stack, tasks: int, *, timeout_s: float, agent: str = "shell") -> dict[str, Any]:
    """`tasks` tasks at once, read once all have PromptDelivered, then cancelled.

    The stack must let `tasks` run at once (BATON_MAX_RUNNING_TASKS ≥ tasks); those it holds
    `queued` never deliver their prompt, and the reading says how many did.
    """
    assert stack.nats is not None
    from_seq = await stream_last_seq(stack.nats.url) + 1
    deadline = time.monotonic() + timeout_s
    limits = httpx.Limits(max_connections=tasks, max_keepalive_connections=tasks)
    async with BoardFeed(stack, from_seq) as feed, \
            httpx.AsyncClient(timeout=60, limits=limits, headers=stack.auth) as client:
        available_before = mem_available_mb()
        started = time.monotonic()
        submitted = await asyncio.gather(*(pipeline._submit(client, stack, f"sleep {HOLD_S}\n", agent=agent)
                                           for _ in range(tasks)))
        task_ids = [task_id for task_id, _ in submitted]
        seen = await asyncio.gather(*(feed.wait_for(t, ("PromptDelivered", *TERMINAL), timeout_s=timeout_s)
                                      for t in task_ids))
        delivered = [t for t, s in zip(task_ids, seen, strict=True) if s and "PromptDelivered" in s.events]
        delivered_s = time.monotonic() - started
        log(f"memory: {len(delivered)}/{tasks} {agent} tasks delivered their prompt in {delivered_s:.1f} s")
        reading = await peak_reading(stack, delivered)
        available_drop = available_before - mem_available_mb()
        for task_id in task_ids:
            await client.post(f"{stack.api}/api/tasks/{task_id}/cancel")
        ended = await asyncio.gather(*(feed.wait_for(t, ENDED, timeout_s=max(deadline - time.monotonic(), 1))
                                       for t in task_ids))
    per_task = list(reading["tasks"].values())
    if not per_task:
        raise RuntimeError(f"no running vm_agent found for any of {len(delivered)} delivered {agent} tasks")
    fixed_mb = sum(reading["fixed_mb"].values())
    pool_mb = sum(reading["pool_member_mb"])
    total = _spread([t["total_mb"] for t in per_task])
    return {
        "agent": agent, "tasks": tasks, "delivered": len(delivered), "read": len(per_task),
        "all_delivered_s": round(delivered_s, 1),
        "per_task_mb": {key: _spread([t[f"{key}_mb"] for t in per_task])
                        for key in ("vm_agent", "agent_tree", "total", "total_uss")},
        # CPU the task's processes used by the reading (a warm member's start-up included).
        "cpu_s_per_task": _spread([t["cpu_s"] for t in per_task]),
        "processes_per_task": statistics.median(len(t["processes"]) for t in per_task),
        "a_task_s_processes": per_task[0]["processes"],
        "a_task_s_cpu_s_by_process": per_task[0]["cpu_s_by_process"],
        "pool_members": len(reading["pool_member_mb"]),
        "pool_member_mb": _spread(reading["pool_member_mb"]) if reading["pool_member_mb"] else None,
        "pool_mb": round(pool_mb, 1),
        "fixed_mb": round(fixed_mb, 1),
        "fixed_by_process_mb": reading["fixed_mb"],
        "max_tasks_24gb": max_tasks(fixed_mb, pool_mb, total["p90"]),
        "formula": f"floor(({MACHINE_GIB} GiB x {1 - HEADROOM:.2f} - fixed - idle pool) / per-task total PSS p90)",
        # The whole machine's view (kernel memory and page cache included; others' processes too).
        "mem_available_drop_per_task_mb": round(available_drop / max(len(delivered), 1), 1),
        "ended": sum(1 for s in ended if s and any(e in s.events for e in ENDED)),
    }


@contextmanager
def memory_stack(root: Path, agent: str, most_tasks: int) -> Iterator[Stack]:
    """A stack that runs `most_tasks` at once: for Claude, against the fake model server."""
    env = {"BATON_MAX_RUNNING_TASKS": str(most_tasks)}
    agents_dir = None
    with contextlib.ExitStack() as models:
        if agent != "shell":
            agents_dir = install_agents(agent)
            env |= models.enter_context(fake_models(f"sk-bench-{secrets.token_hex(12)}"))
            env["BATON_WARM_AGENTS"] = f"shell=1,{agent}=1"
        with stack_with(root, env, agents_dir) as stack:
            yield stack


def print_table(result: dict[str, Any]) -> None:
    row = "{:<8}{:>6}{:>10}{:>12}{:>10}{:>10}{:>10}{:>10}{:>8}{:>8}{:>12}"
    print(row.format("agent", "N", "vm_agent", "agent tree", "task p50", "task p90", "USS p50", "MemAvail",
                     "pool", "fixed", "max on 24GB"), file=sys.stderr)
    for r in result["runs"]:
        m = r["per_task_mb"]
        print(row.format(r["agent"], r["tasks"], m["vm_agent"]["p50"], m["agent_tree"]["p50"], m["total"]["p50"],
                         m["total"]["p90"], m["total_uss"]["p50"],
                         r["mem_available_drop_per_task_mb"], r["pool_mb"], r["fixed_mb"], r["max_tasks_24gb"]),
              file=sys.stderr)


async def run(stack: Stack, counts: list[int], agent: str, timeout_s: float) -> list[dict[str, Any]]:
    runs = []
    for count in counts:
        await wait_until_pool_warm(stack, timeout_s=60)
        runs.append(await memory_per_task(stack, count, timeout_s=timeout_s, agent=agent))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="10,20,40", help="tasks at once, one run per count")
    parser.add_argument("--agent", default="shell", help="shell, or a real agent's kind (claude)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per run")
    args = parser.parse_args()
    counts = [int(n) for n in args.tasks.split(",") if n]
    with tempfile.TemporaryDirectory(prefix="baton-bench-memory-") as root, \
            memory_stack(Path(root), args.agent, max(counts)) as stack:
        runs = asyncio.run(run(stack, counts, args.agent, args.timeout))
    result = {"runs": runs, "max_running_tasks_default_here": default_max_running_tasks()}
    print_table(result)
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
