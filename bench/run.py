"""Baton's benchmarks, in one command: `.venv/bin/python bench/run.py [--quick]`.

Starts its own nats-server (free port) and `baton up` (free port, temp data dir), runs every
benchmark, prints a table, and prints one JSON object as the very last line of stdout.
Every process it started is stopped in `finally`. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import first_paint, memory, partitions, pipeline, projection, raw_nats, replicas
from bench.cpu_ledger import CpuLedger
from bench.stack import RssSampler, Stack, log, wait_until_consumers_idle, wait_until_pool_warm

SIZES = {
    #                          quick    full
    "output_lines":          (5_000,  50_000),
    "replay_events":         (5_000,  50_000),
    "replay_rounds":         (1,      2),
    "submit_tasks":          (20,     100),     # one task in flight: the goal
    "submit_concurrent_tasks": (20,   100),     # then `submit_concurrency` at a time: no goal
    "submit_concurrency":    (5,      5),
    "submit_wide_tasks":     (40,     100),     # then `submit_wide_concurrency` at a time (issue 17)
    "submit_wide_concurrency": (20,   20),
    "concurrent_tasks":      (200,    200),     # issue 17: "200 tasks at once" in the quick run too
    "replicas_tasks":        (40,     200),     # the concurrent run again on `baton up --replicas 2`
    "memory_tasks":          (8,      8),       # running at once, read for their memory (≤ the stack's limit)
    "first_paint_events":    (100_000, 100_000),  # the late viewer's task (the goal is defined at 100k)
    "first_paint_rounds":    (1,      3),
    "projection_events":     (20_000, 100_000),
    "tail_sleep_s":          (5,      5),       # 0 shows the shell agent's lost output tail
    "move_killed_rounds":    (3,      4),       # partition moves, all at once (8 rounds at most)
    "move_frozen_rounds":    (1,      2),
    "move_busy_rounds":      (1,      2),
    "replicas":              (2,      2),       # `baton up --replicas N` for concurrent_tasks again
}

RUN_BUDGET_S = (420, 1200)
"""Quick and full: benchmarks stop by then; stopping the stack (up to ~30 s) and printing follow.
(140 and 840 s before the second stack, `baton up --replicas 2`, was measured too.)"""

REPLICAS_SHARE_S = (130, 330)
"""Of RUN_BUDGET_S, what the replicas' stack gets (its start, a warm pool, the concurrent run, its stop)."""

BENCHMARKS = ("projection", "partitions", "output", "replay", "submit", "memory", "first_paint", "concurrent",
              "replicas")

GOALS = {
    "output_ratio": (">=", 0.5),
    "replay_ratio": (">=", 0.5),
    "submit_to_prompt_p50_ms": ("<=", 150),
    "submit_to_prompt_p99_ms": ("<=", 500),
    # Issue 17: bursts start as fast as one task.
    "submit_to_prompt_concurrent_p50_ms": ("<=", 300),
    "submit_to_prompt_concurrent_p99_ms": ("<=", 1000),
    "submit_to_prompt_wide_p50_ms": ("<=", 300),
    "submit_to_prompt_wide_p99_ms": ("<=", 1000),
    "projection_rebuild_eps": (">=", 20_000),
    "gateway_peak_rss_mb": ("<", 300),
    "partition_move_s": ("<=", 10),  # issue 16: "a dead replica's partitions move to a live one within seconds"
    # Issue 17: 200 tasks at once, and a late viewer's first screen of a 100,000-event task.
    "concurrent_tasks_s": ("<=", 60),
    "late_viewer_first_line_ms": ("<=", 1000),
    "late_viewer_tail_ms": ("<=", 1000),
}


def met(key: str, value: Any) -> bool | None:
    if key not in GOALS or value is None:
        return None
    op, goal = GOALS[key]
    return {">=": value >= goal, "<=": value <= goal, "<": value < goal}[op]


class Bench:
    def __init__(self, *, quick: bool, only: tuple[str, ...], profile_dir: Path | None,
                 sizes: dict[str, int]) -> None:
        self.quick = quick
        self.only = only
        self.profile_dir = profile_dir
        self.size = {k: v[0 if quick else 1] for k, v in SIZES.items()} | sizes
        self.details: dict[str, Any] = {}
        self.errors: dict[str, str] = {}
        self.load_at_start = os.getloadavg()[0]
        self.source = source_state()  # The code measured: as it was when the run started.
        # Everything must end in time (quick: 5.5 min, full: 19 min), stopping the stacks included.
        self.deadline = time.monotonic() + (RUN_BUDGET_S[0 if quick else 1] if profile_dir is None else 3600)
        # The replicas' stack runs last: its share is kept back, so a slow run shortens each part
        # rather than leaving it none.
        self.reserved_s = REPLICAS_SHARE_S[0 if quick else 1] if self.wants("replicas") else 0
        self.deadline -= self.reserved_s

    def budget(self, wanted_s: float) -> float:
        """A benchmark's timeout: what it wants, but never past the run's deadline."""
        return max(1.0, min(wanted_s, self.deadline - time.monotonic()))

    def wants(self, name: str) -> bool:
        return name in self.only

    async def settle(self, stack: Stack) -> float:
        """Let the services finish the previous benchmark's backlog before the next starts.

        Returns how long that took (after a direct publish, it is the services' consume rate).
        """
        assert stack.nats is not None
        started = time.monotonic()
        busy = await wait_until_consumers_idle(stack.nats.url, timeout_s=self.budget(120 if self.quick else 240))
        if not await wait_until_pool_warm(stack, timeout_s=self.budget(60)):
            log("the warm vm_agent pool did not fill up in time")
        waited = time.monotonic() - started
        if waited > 1 or busy:
            log(f"waited {waited:.1f}s for the services' backlog" + (f"; still pending: {busy}" if busy else ""))
        return waited

    async def step(self, name: str, run: Callable[[], Awaitable[Any]]) -> Any:
        if self.deadline - time.monotonic() < 5:
            self.errors[name] = "skipped: the run's time budget is spent"
            log(f"{name} skipped: out of time")
            return None
        log(f"{name} …")
        started = time.monotonic()
        try:
            result = await run()
        except Exception as error:  # noqa: BLE001 - one failing benchmark must not hide the others.
            self.errors[name] = f"{type(error).__name__}: {error}"
            log(f"{name} FAILED: {self.errors[name]}")
            traceback.print_exc(file=sys.stderr)
            return None
        self.details[name] = result
        log(f"{name} done in {time.monotonic() - started:.1f}s")
        return result

    # -- the benchmarks that need the stack ----------------------------------------------------

    async def run_stack_benchmarks(self, stack: Stack, sampler: RssSampler) -> None:
        assert stack.nats is not None
        output = None
        if self.wants("output") or self.wants("replay"):
            lines = self.size["output_lines"]
            sampler.phase = "output"
            await self.settle(stack)
            output = await self.step("output", lambda: self._profiled(
                "output", stack, lambda: self._output(stack, lines)))
            if output and self.wants("output"):
                await self.settle(stack)  # The ceiling is measured with Baton idle.
                sampler.phase = "raw"
                await self.step("raw_publish_consume", lambda: raw_nats.publish_and_consume(
                    stack.nats.url, lines, output["envelope_bytes"]))
        if self.wants("replay") and output:
            sampler.phase = "replay"
            replay_task = await self.step("replay_task", lambda: self._replay_task(stack, output))
            if replay_task:
                drained_s = await self.settle(stack)
                if replay_task["source"].startswith("published"):
                    # Every durable consumer (projector, monitor) had the whole task to read at once.
                    self.details["consumers_catch_up"] = {"events": replay_task["events"], "seconds": drained_s}
                await self.step("replay", lambda: self._profiled("replay", stack, lambda: pipeline.replay(
                    stack, replay_task["task_id"], replay_task["events"],
                    rounds=self.size["replay_rounds"], timeout_s=self.budget(300)), services=("gateway",)))
        everything = ("gateway", "task-runner", "provisioner", "projector", "monitor")
        if self.wants("submit"):
            await self.settle(stack)
            sampler.phase = "submit"
            await self.step("submit_to_prompt", lambda: self._profiled("submit", stack, lambda: (
                pipeline.submit_to_prompt(stack, self.size["submit_tasks"], concurrency=1, until_end=True,
                                          timeout_s=self.budget(60 if self.quick else 240))), services=everything))
            await self.settle(stack)
            await self.step("submit_concurrent", lambda: pipeline.submit_to_prompt(
                stack, self.size["submit_concurrent_tasks"], concurrency=self.size["submit_concurrency"],
                timeout_s=self.budget(90 if self.quick else 300)))
            await self.settle(stack)
            await self.step("submit_wide", lambda: pipeline.submit_to_prompt(
                stack, self.size["submit_wide_tasks"], concurrency=self.size["submit_wide_concurrency"],
                timeout_s=self.budget(120 if self.quick else 300)))
        if self.wants("memory"):
            await self.settle(stack)
            sampler.phase = "memory"
            await self.step("memory", lambda: memory.memory_per_task(
                stack, self.size["memory_tasks"], timeout_s=self.budget(60 if self.quick else 120)))
        if self.wants("first_paint"):
            await self.settle(stack)
            sampler.phase = "first_paint"
            await self.step("first_paint", lambda: first_paint.first_paint(
                stack, self.size["first_paint_events"], rounds=self.size["first_paint_rounds"],
                timeout_s=self.budget(90 if self.quick else 180)))
        if self.wants("concurrent"):
            await self.settle(stack)
            await self.step("concurrent", lambda: self._profiled("concurrent", stack, lambda: self._concurrent(
                stack, sampler), services=everything))

    async def run_replicas(self, root: Path) -> None:
        """The concurrent run again on `baton up --replicas N`, on a stack of its own."""
        self.deadline, self.reserved_s = self.deadline + self.reserved_s, 0
        if self.wants("replicas"):
            await self.step("concurrent_replicas", lambda: replicas.concurrent_on_replicas(
                root / "replicas", replicas=self.size["replicas"], tasks=self.size["replicas_tasks"],
                settle=self.settle, timeout_s=lambda: self.budget(120 if self.quick else 420)))

    async def _concurrent(self, stack: Stack, sampler: RssSampler) -> dict[str, Any]:
        """Many tasks at once, with where the CPU went (bench/cpu_ledger.py)."""
        assert stack.nats is not None and stack.nats.process is not None
        with CpuLedger(stack.data_dir, nats_pid=stack.nats.process.pid) as ledger:
            result = await pipeline.concurrent_tasks(stack, self.size["concurrent_tasks"], sampler,
                                                     timeout_s=self.budget(100 if self.quick else 420))
        return {**result, "cpu_s_by_kind": ledger.by_kind(), "machine_busy_s": ledger.machine_busy_s}

    async def _output(self, stack: Stack, lines: int) -> dict[str, Any]:
        timeout_s = 900 if self.profile_dir else self.budget(120 if self.quick else 600)
        return await pipeline.output_throughput(stack, lines, timeout_s=timeout_s,
                                                tail_sleep_s=self.size["tail_sleep_s"])

    async def _replay_task(self, stack: Stack, output: dict[str, Any]) -> dict[str, Any]:
        """The task a late viewer replays: the output benchmark's real task when it is big enough
        (`--size output_lines=N` with N ≥ replay_events), else one published straight to the stream.

        No real task is printed just for the replay: how long one takes cannot be predicted from
        a smaller run (before 5621244 the output rate fell as a task grew; docs/benchmarks.md).
        """
        target = self.size["replay_events"]
        if output["events"] >= target:
            return {"task_id": output["task_id"], "events": output["events"],
                    "source": f"real: the output benchmark's shell task ({output['lines']:,} lines)"}
        task_id = await pipeline.publish_replay_task(stack, target)
        return {"task_id": task_id, "events": target,
                "source": (f"published directly: {target - 1:,} AgentOutput envelopes + TaskCompleted "
                           f"(the real output task has {output['events']:,} events; "
                           f"--size output_lines={target} makes the replay task real)")}

    async def _profiled(self, prefix: str, stack: Stack, run: Callable[[], Awaitable[Any]],
                        services: tuple[str, ...] = ("gateway", "projector", "monitor")) -> Any:
        """Run a benchmark, with py-spy attached when --profile was given."""
        if self.profile_dir is None:
            return await run()
        from bench.profiling import Profilers

        profilers = Profilers(stack, self.profile_dir, prefix=prefix, services=services)
        profilers.start()
        # Attach to the task's vm_agent (and its agent) as soon as the provisioner starts it.
        original = pipeline._submit

        async def submit_and_follow(client: Any, stack_: Stack, prompt: str, **kwargs: Any) -> tuple[str, float]:
            task_id, sent_at = await original(client, stack_, prompt, **kwargs)
            profilers.follow_task(task_id)
            return task_id, sent_at

        pipeline._submit = submit_and_follow
        try:
            return await run()
        finally:
            pipeline._submit = original
            await profilers.stop()

    # -- the result --------------------------------------------------------------------------

    def summary(self, elapsed_s: float, sampler: RssSampler | None) -> dict[str, Any]:
        d = self.details
        out, raw, rep = d.get("output"), d.get("raw_publish_consume"), d.get("replay")
        sub, par, con, proj = (d.get("submit_to_prompt"), d.get("submit_concurrent"), d.get("concurrent"),
                               d.get("projection"))
        wide = d.get("submit_wide")
        result: dict[str, Any] = {
            "quick": self.quick,
            "source": self.source,
            "output_ratio": out["rate"] / raw["rate"] if out and raw else None,
            "output_rate_eps": out and out["rate"],
            "output_raw_rate_eps": raw and raw["rate"],
            "output_raw_variant": raw and raw["best"],
            "output_raw_variants_eps": raw and raw["variants"],
            "output_vm_agent_record_rate_eps": out and out["recorded_rate"],
            "output_lines": out and out["lines"],
            "output_lines_lost": out and out["lost"],
            "output_envelope_bytes": out and out["envelope_bytes"],
            "replay_ratio": rep["ws_rate"] / rep["raw_ordered_rate"] if rep else None,
            "replay_rate_eps": rep and rep["ws_rate"],
            "replay_single_ratio": rep["ws_single_rate"] / rep["raw_ordered_rate"] if rep else None,
            "replay_single_rate_eps": rep and rep["ws_single_rate"],
            "replay_raw_rate_eps": rep and rep["raw_ordered_rate"],
            "replay_raw_pull256_rate_eps": rep and rep["raw_pull256_rate"],
            "replay_events": rep and rep["events"],
            "replay_source": d.get("replay_task", {}).get("source"),
            # After the replay task was published at once: how fast the projector and the monitor
            # worked through it (None when the replay task was real and consumed as it ran).
            "consumers_catch_up_eps": (d["consumers_catch_up"]["events"] / d["consumers_catch_up"]["seconds"]
                                       if d.get("consumers_catch_up") else None),
            "submit_to_prompt_p50_ms": sub and sub["p50_ms"],
            "submit_to_prompt_p99_ms": sub and sub["p99_ms"],
            "submit_to_prompt_observed_p50_ms": sub and sub["observed_p50_ms"],
            "submit_to_prompt_stage_p50_ms": sub and sub["stage_p50_ms"],
            "submit_tasks": sub and sub["tasks"],
            "submit_without_prompt": sub and sub["missing_prompt"],
            "submit_outcomes": sub and sub["outcomes"],
            "submit_to_prompt_concurrent_p50_ms": par and par["p50_ms"],
            "submit_to_prompt_concurrent_p99_ms": par and par["p99_ms"],
            "submit_to_prompt_concurrent_stage_p50_ms": par and par["stage_p50_ms"],
            "submit_concurrent_tasks": par and par["tasks"],
            "submit_concurrency": par and par["concurrency"],
            "submit_to_prompt_wide_p50_ms": wide and wide["p50_ms"],
            "submit_to_prompt_wide_p99_ms": wide and wide["p99_ms"],
            "submit_to_prompt_wide_stage_p50_ms": wide and wide["stage_p50_ms"],
            "submit_wide_tasks": wide and wide["tasks"],
            "submit_wide_concurrency": wide and wide["concurrency"],
            "projection_rebuild_eps": proj and proj["combined_eps"],
            "projection_board_eps": proj and proj["board_eps"],
            "projection_audit_eps": proj and proj["audit_eps"],
            "projection_events": proj and proj["events"],
            "projection_mode": proj and proj["mode"],
            "projection_per_event_eps": proj and (proj.get("per_event") or {}).get("combined_eps"),
            "concurrent_tasks": con and con["tasks"],
            "concurrent_tasks_s": con and con["seconds"],
            "concurrent_all_completed": con and con["outcomes"] == {"TaskCompleted": con["tasks"]},
            "concurrent_outcomes": con and con["outcomes"],
            "concurrent_submit_s": con and con["submit_s"],
            "concurrent_feed_drops": con and con["feed_drops"],
            # Where the CPU went, per task, by kind of process (bench/cpu_ledger.py); and the whole
            # machine's busy CPU per task over the same time (other work on the machine included).
            "concurrent_cpu_ms_per_task": con and {
                kind: round(1000 * s / con["tasks"]) for kind, s in con["cpu_s_by_kind"].items()},
            "concurrent_machine_cpu_ms_per_task": con and 1000 * con["machine_busy_s"] / con["tasks"],
            **replica_figures(d.get("partition_move"), d.get("concurrent_replicas")),
            **late_viewer_figures(d.get("first_paint")),
            **memory_figures(d.get("memory")),
            "gateway_restarts": sampler.gateway_restarts if sampler else None,
            "gateway_peak_rss_mb": con and con["gateway_peak_rss_mb"],
            "gateway_peak_rss_mb_any_phase": sampler.overall_peak if sampler else None,
            "profile_dir": str(self.profile_dir) if self.profile_dir else None,
            "errors": self.errors,
            "run_s": elapsed_s,
            # Other work on the machine skews every figure: the 1-minute load at start and end.
            "load_avg_1m": [round(self.load_at_start, 2), round(os.getloadavg()[0], 2)],
        }
        result["goals_met"] = {k: met(k, result.get(k)) for k in GOALS}
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items()}


def replica_figures(move: dict[str, Any] | None, rep: dict[str, Any] | None) -> dict[str, Any]:
    """Issue 16's figures: how long a dead replica's partition takes to move (median of the rounds
    of each death, bench/partitions.py), and the concurrent run on N replicas of every service."""
    return {
        "partition_move_s": move and move["killed_median_s"],
        "partition_move_frozen_s": move and move["frozen_median_s"],
        "partition_move_busy_s": move and move["busy_median_s"],
        "partition_move_rounds_s": move and {d: move[f"{d}_s"] for d in partitions.DEATHS},
        "concurrent_replicas": rep and rep["replicas"],
        "concurrent_replicas_tasks_s": rep and rep["seconds"],
        "concurrent_replicas_all_completed": rep and rep["outcomes"] == {"TaskCompleted": rep["tasks"]},
        "concurrent_replicas_outcomes": rep and rep["outcomes"],
        "concurrent_replicas_prompt_p50_s": rep and rep["prompt_p50_s"],
        "concurrent_replicas_gateway_peak_rss_mb": rep and rep["gateway_peak_rss_mb"],
        "concurrent_replicas_stack_start_s": rep and rep["stack_start_s"],
    }


def late_viewer_figures(paint: dict[str, Any] | None) -> dict[str, Any]:
    """Issue 17: a late viewer of a task of 100,000 events in Chromium (bench/first_paint.py), ms."""
    finished, running = (paint or {}).get("finished") or {}, (paint or {}).get("running") or {}
    return {
        "late_viewer_events": paint and paint["events"],
        "late_viewer_first_line_ms": finished.get("first_line_ms"),
        "late_viewer_tail_ms": finished.get("tail_ms"),
        "late_viewer_running_first_line_ms": running.get("first_line_ms"),
        "late_viewer_running_tail_ms": running.get("tail_ms"),
        "late_viewer_live_line_ms": running.get("live_line_ms"),
        "late_viewer_fcp_ms": finished.get("fcp_ms"),
    }


def memory_figures(mem: dict[str, Any] | None) -> dict[str, Any]:
    """Issue 17: what a running shell task holds (PSS of its vm_agent and all under it, MB), what
    Baton holds besides, and how many such tasks one 24 GB machine holds (bench/memory.py)."""
    if not mem:
        return {"memory_per_task_mb": None}
    return {
        "memory_tasks": mem["delivered"],
        "memory_per_task_mb": mem["per_task_mb"]["total"]["p50"],
        "memory_per_task_p90_mb": mem["per_task_mb"]["total"]["p90"],
        "memory_per_task_uss_mb": mem["per_task_mb"]["total_uss"]["p50"],
        "memory_vm_agent_mb": mem["per_task_mb"]["vm_agent"]["p50"],
        "memory_agent_tree_mb": mem["per_task_mb"]["agent_tree"]["p50"],
        "memory_fixed_mb": mem["fixed_mb"],
        "memory_idle_pool_mb": mem["pool_mb"],
        "memory_pool_members": mem["pool_members"],
        "max_tasks_24gb": mem["max_tasks_24gb"],
        "max_tasks_formula": mem["formula"],
    }


def source_state() -> str:
    """Which code was measured: the commit, and how many files differ from it."""
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--", ".", ":!bench"], cwd=REPO_ROOT,
                                 capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("BENCH_SOURCE", "unknown")
    return f"{commit}" + (f" + {len(changed)} uncommitted file(s)" if changed else "")


def print_table(result: dict[str, Any], bench: Bench) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout, width=140)

    def fmt(value: Any, unit: str = "") -> str:
        if value is None:
            return "—"
        if isinstance(value, float):
            text = f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}"
        else:
            text = f"{value:,}" if isinstance(value, int) else str(value)
        return f"{text}{unit}"

    def verdict(key: str) -> str:
        ok = result["goals_met"].get(key)
        return "—" if ok is None else ("[green]met[/]" if ok else "[red]not met[/]")

    def goal(key: str) -> str:
        op, value = GOALS[key]
        return f"{op} {value:,}"

    d = bench.details
    table = Table(title=f"Baton benchmarks ({'quick' if bench.quick else 'full'}, {result['run_s']:.0f}s, "
                        f"{os.cpu_count()} CPUs, source {result['source']})")
    for column in ("figure", "value", "goal", "", "how (raw figures)"):
        table.add_column(column)
    out = d.get("output")
    if out:
        table.add_row("output_ratio", fmt(result["output_ratio"]), goal("output_ratio"), verdict("output_ratio"),
                      f"{fmt(result['output_rate_eps'])}/s viewer vs {fmt(result['output_raw_rate_eps'])}/s "
                      f"raw ({result['output_raw_variant']}), {fmt(out['lines'])} lines in "
                      f"{fmt(result['output_envelope_bytes'])} B envelopes; the vm_agent recorded "
                      f"{fmt(result['output_vm_agent_record_rate_eps'])}/s"
                      + (f"; [red]{out['lost']} lines lost[/]" if out["lost"] else ""))
    if d.get("replay"):
        table.add_row("replay_ratio", fmt(result["replay_ratio"]), goal("replay_ratio"), verdict("replay_ratio"),
                      f"{fmt(result['replay_rate_eps'])}/s WebSocket as the web UI reads (batch=1; one event "
                      f"per message: {fmt(result['replay_single_rate_eps'])}/s = {fmt(result['replay_single_ratio'])}) "
                      f"vs {fmt(result['replay_raw_rate_eps'])}/s "
                      f"ordered consumer ({fmt(result['replay_raw_pull256_rate_eps'])}/s pull 256), "
                      f"{fmt(result['replay_events'])} events; {result['replay_source']}"
                      + (f"; the projector and monitor then took {fmt(d['consumers_catch_up']['seconds'])} s "
                         f"to read it ({fmt(result['consumers_catch_up_eps'])}/s)" if d.get("consumers_catch_up") else ""))
    sub = d.get("submit_to_prompt")
    if sub:
        stages = ", ".join(f"{k.split('->')[1]} +{v:,.0f}" for k, v in sub["stage_p50_ms"].items())
        table.add_row("submit_to_prompt_p50_ms", fmt(result["submit_to_prompt_p50_ms"], " ms"),
                      goal("submit_to_prompt_p50_ms"), verdict("submit_to_prompt_p50_ms"),
                      f"{sub['tasks']} tasks, one in flight (the next POST once the last ended); "
                      f"p50 of each handoff (ms): {stages}")
        table.add_row("submit_to_prompt_p99_ms", fmt(result["submit_to_prompt_p99_ms"], " ms"),
                      goal("submit_to_prompt_p99_ms"), verdict("submit_to_prompt_p99_ms"),
                      f"seen on the stream: p50 {fmt(sub['observed_p50_ms'])} ms, p99 {fmt(sub['observed_p99_ms'])} "
                      f"ms; outcomes {sub['outcomes']}"
                      + (f"; [red]{sub['missing_prompt']} without PromptDelivered[/]" if sub["missing_prompt"] else ""))
    for name, key in (("submit_concurrent", "concurrent"), ("submit_wide", "wide")):
        if not (many := d.get(name)):
            continue
        stages = ", ".join(f"{k.split('->')[1]} +{v:,.0f}" for k, v in many["stage_p50_ms"].items())
        p50, p99 = f"submit_to_prompt_{key}_p50_ms", f"submit_to_prompt_{key}_p99_ms"
        table.add_row(f"… {many['concurrency']} at a time, p50/p99",
                      f"{fmt(many['p50_ms'])}/{fmt(many['p99_ms'])} ms", f"{goal(p50)} / {goal(p99)}",
                      f"{verdict(p50)} / {verdict(p99)}",
                      f"{many['tasks']} tasks, {many['concurrency']} between POST and PromptDelivered at any "
                      f"time; p50 of each handoff (ms): {stages}; outcomes {many['outcomes']}")
    proj = d.get("projection")
    if proj:
        table.add_row("projection_rebuild_eps", fmt(result["projection_rebuild_eps"], "/s"),
                      goal("projection_rebuild_eps"), verdict("projection_rebuild_eps"),
                      f"board {fmt(proj['board_eps'])}/s ({fmt(proj['board_events'])} events), audit log "
                      f"{fmt(proj['audit_eps'])}/s ({fmt(proj['events'])} events), {proj['mode']}"
                      + (f"; one event per transaction: {fmt(proj['per_event']['combined_eps'])}/s"
                         if proj.get("per_event") else ""))
    if d.get("first_paint"):
        for key in ("late_viewer_first_line_ms", "late_viewer_tail_ms"):
            table.add_row(key, fmt(result[key], " ms"), goal(key), verdict(key),
                          f"{fmt(result['late_viewer_events'])} events, Chromium, from navigation start; a running "
                          f"task: first line {fmt(result['late_viewer_running_first_line_ms'])} ms, tail "
                          f"{fmt(result['late_viewer_running_tail_ms'])} ms, a new live line "
                          f"{fmt(result['late_viewer_live_line_ms'])} ms")
    if d.get("memory"):
        table.add_row("memory_per_task_mb", fmt(result["memory_per_task_mb"], " MB"), "—", "",
                      f"PSS of a running shell task's vm_agent and all under it, p50 of {result['memory_tasks']} "
                      f"(USS {fmt(result['memory_per_task_uss_mb'])} MB); fixed {fmt(result['memory_fixed_mb'])} MB, "
                      f"idle pool {fmt(result['memory_idle_pool_mb'])} MB ({result['memory_pool_members']} members); "
                      f"max tasks on 24 GB: {result['max_tasks_24gb']} = {result['max_tasks_formula']}")
    con = d.get("concurrent")
    if con:
        table.add_row("concurrent_tasks_s", fmt(result["concurrent_tasks_s"], " s"), goal("concurrent_tasks_s"),
                      verdict("concurrent_tasks_s") if result["concurrent_all_completed"]
                      else "[red]not all completed[/]",
                      f"{con['tasks']} at once (the POSTs took {fmt(con['submit_s'])} s); outcomes {con['outcomes']}"
                      f"; CPU per task (ms) {result['concurrent_cpu_ms_per_task']}"
                      + (f"; failures {con['failure_reasons']}" if con["failure_reasons"] else "")
                      + (f"; last end after {fmt(con['last_end_s'])} s" if con["seconds"] is None else "")
                      + (f"; ABORTED: {con['aborted']}" if con["aborted"] else "")
                      + (f"; [red]board feed dropped {len(con['feed_drops'])}x: {con['feed_drops'][:2]}[/]"
                         if con["feed_drops"] else "")
                      + (f"; [red]the gateway restarted {con['gateway_restarts']}x[/]"
                         if con["gateway_restarts"] else ""))
        table.add_row("gateway_peak_rss_mb", fmt(result["gateway_peak_rss_mb"], " MB"),
                      goal("gateway_peak_rss_mb"), verdict("gateway_peak_rss_mb"),
                      f"VmRSS every 100 ms during the concurrent run ({con['rss_samples']} samples); "
                      f"peak over every phase {fmt(result['gateway_peak_rss_mb_any_phase'])} MB; machine's "
                      f"lowest MemAvailable {fmt(con['min_mem_available_mb'])} MB")
    add_replica_rows(table, result, d, fmt, verdict, goal)
    console.print(table)
    busy = max(result["load_avg_1m"])
    if busy > (os.cpu_count() or 1):
        console.print(f"[yellow]The machine was busy (1-minute load up to {busy:.1f} on {os.cpu_count()} CPUs): "
                      "figures are lower than on an idle machine.[/]")
    for name, error in result["errors"].items():
        console.print(f"[red]{name} failed:[/] {error}")


def add_replica_rows(table: Any, result: dict[str, Any], d: dict[str, Any], fmt: Callable[..., str],
                     verdict: Callable[[str], str], goal: Callable[[str], str]) -> None:
    move, rep = d.get("partition_move"), d.get("concurrent_replicas")
    if move:
        table.add_row("partition_move_s", fmt(result["partition_move_s"], " s"), goal("partition_move_s"),
                      verdict("partition_move_s"),
                      f"two replicas on one partition's consumer, the pinned one killed idle: median of "
                      f"{move['killed_s']}; frozen (connection left open) {fmt(result['partition_move_frozen_s'])} s; "
                      f"killed while handling an event {fmt(result['partition_move_busy_s'])} s "
                      f"(pin timeout {move['pin_timeout_s']} s, ack wait {move['ack_wait_s']} s)")
    if rep:
        table.add_row(f"concurrent_tasks_s, {rep['replicas']} replicas", fmt(rep["seconds"], " s"), "—",
                      "" if result["concurrent_replicas_all_completed"] else "[red]not all completed[/]",
                      f"{rep['tasks']} at once on `baton up --replicas {rep['replicas']}` (healthy in "
                      f"{fmt(rep['stack_start_s'])} s); outcomes {rep['outcomes']}"
                      + (f"; failures {rep['failure_reasons']}" if rep["failure_reasons"] else "")
                      + (f"; last end after {fmt(rep['last_end_s'])} s" if rep["seconds"] is None else "")
                      + f"; gateway 0 peak {fmt(rep['gateway_peak_rss_mb'])} MB")


async def main_async(bench: Bench, root: Path, sampler_box: list[RssSampler]) -> None:
    if bench.wants("projection"):
        # In-process, before the stack starts, so nothing else competes for the CPU or the disk.
        await bench.step("projection", lambda: asyncio.to_thread(
            projection.run, bench.size["projection_events"], workdir=root,
            per_event_max=5_000 if bench.quick else 20_000))
    if bench.wants("partitions"):
        await bench.step("partition_move", lambda: partitions.run({
            death: bench.size[f"move_{death}_rounds"] for death in partitions.DEATHS}, workdir=root))
    if not set(bench.only) - {"projection", "partitions", "replicas"}:
        await bench.run_replicas(root)
        return
    stack = Stack(root)
    sampler: RssSampler | None = None
    try:
        log(f"starting nats-server and baton up under {root}")
        stack.start()
        log(f"stack up at {stack.api} (nats {stack.nats.url if stack.nats else '?'})")
        sampler = RssSampler(stack).start()
        sampler_box.append(sampler)
        await bench.run_stack_benchmarks(stack, sampler)
    except Exception as error:  # noqa: BLE001 - reported in the JSON; processes still stopped.
        bench.errors["stack"] = f"{type(error).__name__}: {error}"
        traceback.print_exc(file=sys.stderr)
        if stack.baton is not None:
            print(stack.baton.logs()[-6000:], file=sys.stderr)
    finally:
        if sampler is not None:
            sampler.stop()
        log("stopping every process")
        stopping = time.monotonic()
        stack.stop()
        log(f"stopped in {time.monotonic() - stopping:.1f}s"
            + (f"; ended {stack.swept} leftover process(es) of this run" if stack.swept else "")
            + (f"; {stack.still_running} STILL RUNNING" if stack.still_running else ""))
    await bench.run_replicas(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes; finishes in under 6 minutes (2.5 on a quiet machine)")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated subset of {','.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--size", action="append", default=[], metavar="NAME=N",
                        help=f"override a size, e.g. --size output_lines=50000 (names: {', '.join(SIZES)})")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="attach py-spy to Baton's services (and the first task's vm_agent) during "
                             "each benchmark; speedscope files go to DIR. Slows Baton down: use with --only")
    parser.add_argument("--keep", action="store_true", help="keep the temp data dir (logs, stores)")
    args = parser.parse_args()

    only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    unknown = set(only) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {', '.join(BENCHMARKS)}")
    sizes = {}
    for item in args.size:
        name, _, value = item.partition("=")
        if name not in SIZES or not value.isdigit():
            parser.error(f"--size {item!r}: use NAME=N with NAME one of {', '.join(SIZES)}")
        sizes[name] = int(value)

    bench = Bench(quick=args.quick, only=only, profile_dir=args.profile.resolve() if args.profile else None,
                  sizes=sizes)
    root = Path(tempfile.mkdtemp(prefix="baton-bench-"))
    started = time.monotonic()
    samplers: list[RssSampler] = []
    try:
        asyncio.run(main_async(bench, root, samplers))
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    result = bench.summary(time.monotonic() - started, samplers[0] if samplers else None)
    if args.profile:
        from bench.profiling import summarize

        for path in sorted(args.profile.glob("*.speedscope.json")):
            result.setdefault("profiles", {})[path.name] = {
                name: {"cpu_s": data["seconds"], "own_pct": data["own"][:6]}
                for name, data in summarize(path, top=6).items() if data["seconds"] >= 0.5
            }
    print_table(result, bench)
    sys.stdout.flush()
    print(json.dumps(result, separators=(",", ":"), default=str), flush=True)


if __name__ == "__main__":
    main()
