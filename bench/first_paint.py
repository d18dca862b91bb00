"""A late viewer in the web UI: how soon Chromium shows a task of 100,000 events, and its live tail.

Two tasks, each opened in headless Debian Chromium (launched as tests/capability/test_web_ui.py
launches it) once logged in, timed from navigation start with the page's own clock:

- finished: `events` events put straight on the stream (`publish_replay_task`: AgentOutput lines,
  then TaskCompleted). First paint = the first output line drawn inside the output box; tail = the
  last line drawn there and the badge saying completed.
- running: a real shell task (it sleeps) that has `events` output lines on the stream on top of its
  handoffs, no terminal event. First paint and tail as above; then one more line is published and
  `live_line_ms` is how long until the page draws it (from just before the publish).

Each is opened `rounds` times (a fresh page each time; the static files are cached, as for a user who
had the UI open before); figures are medians in ms, every round is in `rounds_ms`. `fcp_ms` is the
browser's first-contentful-paint (the page's frame, not yet any event).

    .venv/bin/python -m bench.first_paint [--events 100000] [--rounds 3]

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench.pipeline import publish_replay_task
from bench.stack import Stack, log, wait_until_consumers_idle
from tests.capability.test_web_ui import CHROMIUM, CHROMIUM_ARGS

SLEEPING_PROMPT = "sleep 900\n"
"""The running task's script: it holds its place and prints nothing, so its lines are the bench's."""

DRAWN = """([seq, badge]) => {
  const box = document.querySelector("#output");
  if (!box) return null;
  // Either end of what is rendered (the page may show the oldest lines or the newest first).
  const lines = seq == null ? [box.querySelector("[data-seq]"), box.lastElementChild?.lastElementChild]
    : [box.querySelector(`[data-seq="${seq}"]`)];
  const b = box.getBoundingClientRect();
  const drawn = lines.some((el) => {
    const r = el?.dataset.seq && el.getBoundingClientRect();
    return r && r.height > 0 && r.bottom > b.top && r.top < b.bottom;
  });
  if (!drawn || (badge && document.querySelector("#state .badge")?.textContent !== badge)) return null;
  return performance.now();
}"""
"""performance.now() (ms since navigation start) once output line `seq` (null: any line) is drawn inside
the output box, and the state badge reads `badge` if given. Polled on every animation frame: a frame
is when it is painted."""


RESPONSES = """() => {
  const end = (pattern) => performance.getEntriesByType("resource").find((r) => pattern.test(r.name))?.responseEnd ?? null;
  return { app_js_ms: end(/\\/static\\/app\\.js/), task_ms: end(/\\/api\\/tasks\\/[^/?]+$/),
           handoffs_ms: end(/\\/events\\?before_seq=/) };
}"""
"""Where the time went: when (ms since navigation start) app.js, the task's GET and the GET of the handoffs
before the newest screenful had arrived (null: not asked for). The newest screenful itself comes over
the task's WebSocket, which the Resource Timing API does not time."""


async def first_paint(stack: Stack, events: int, *, timeout_s: float, rounds: int = 3) -> dict[str, Any]:
    """The late viewer's figures for a finished and a running task of `events` events (ms, medians)."""
    from playwright.async_api import async_playwright

    finished_id = await publish_replay_task(stack, events)
    running_id, handoffs = await _running_task_with_lines(stack, events, timeout_s=timeout_s)
    # A late viewer comes after the services have read the history (the board has the task).
    busy = await wait_until_consumers_idle(stack.nats.url, timeout_s=timeout_s)
    log(f"first paint: tasks {finished_id} (finished) and {running_id} (running) on the stream; busy: {busy}")
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 900})
            login = await context.new_page()
            await login.goto(f"{stack.api}/?token={stack.baton.token}")
            await login.close()
            finished = [await _open(context, stack, finished_id, events - 1, "completed", timeout_s=timeout_s)
                        for _ in range(rounds)]
            running: list[dict[str, float | None]] = []
            for _ in range(rounds):
                last = events + sum("live_line_ms" in run for run in running)  # each round adds a line
                running.append(await _open(context, stack, running_id, last, None, timeout_s=timeout_s,
                                           live_seq=last + 1))
        finally:
            await browser.close()
    await _cancel(stack, running_id)
    return {"events": events, "finished": _medians(finished), "running": _medians(running),
            "running_handoffs": handoffs, "consumers_busy": busy}


async def _open(context: Any, stack: Stack, task_id: str, last_seq: int, badge: str | None, *,
                timeout_s: float, live_seq: int | None = None) -> dict[str, float | None]:
    """One late viewer: a fresh page on the task, timed until its first line and its tail are drawn.

    A wait past `timeout_s` gives None for it and for what would follow it (`live_line_ms` is there,
    None or not, once the live line was published)."""
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    figures: dict[str, float | None] = {"first_line_ms": None, "tail_ms": None}
    try:
        await page.goto(f"{stack.api}/tasks/{task_id}", wait_until="commit")
        figures["first_line_ms"] = await _when_drawn(page, None, None, timeout_s=timeout_s)
        if figures["first_line_ms"] is not None:
            figures["tail_ms"] = await _when_drawn(page, last_seq, badge, timeout_s=timeout_s)
        figures["fcp_ms"] = await page.evaluate(
            "performance.getEntriesByName('first-contentful-paint')[0]?.startTime ?? null")
        figures.update(await page.evaluate(RESPONSES))
        if live_seq is not None and figures["tail_ms"] is not None:
            published = time.perf_counter()
            await publish_replay_task(stack, 1, task_id=task_id, first_seq=live_seq, finished=False)
            drawn = await _when_drawn(page, live_seq, None, timeout_s=timeout_s)
            figures["live_line_ms"] = None if drawn is None else (time.perf_counter() - published) * 1000
    finally:
        shown = await page.evaluate("document.querySelector('#app')?.innerText.slice(0, 300) ?? ''")
        await page.close()
    if errors:
        raise RuntimeError(f"JavaScript errors on the task page: {errors}")
    if None in figures.values():
        log(f"first paint: task {task_id} timed out: {figures}; the page showed {shown!r}")
    return figures


async def _when_drawn(page: Any, seq: int | None, badge: str | None, *, timeout_s: float) -> float | None:
    """DRAWN's time, or None past `timeout_s`."""
    from playwright.async_api import TimeoutError as PlaywrightTimeout

    try:
        handle = await page.wait_for_function(DRAWN, arg=[seq, badge], polling="raf", timeout=timeout_s * 1000)
    except PlaywrightTimeout:
        return None
    return await handle.json_value()


async def _running_task_with_lines(stack: Stack, events: int, *, timeout_s: float) -> tuple[str, int]:
    """A real shell task, past PromptDelivered and sleeping, with `events` output lines on the stream."""
    assert stack.origin is not None
    async with httpx.AsyncClient(base_url=stack.api, headers=stack.auth, timeout=30) as client:
        response = await client.post("/api/tasks", json={"repo": stack.origin.as_uri(), "prompt": SLEEPING_PROMPT,
                                                         "agent": "shell"})
        response.raise_for_status()
        task_id = response.json()["task_id"]
        deadline = time.monotonic() + timeout_s
        while True:
            types = [e["type"] for e in (await client.get(f"/api/tasks/{task_id}/events")).json()["events"]]
            if "PromptDelivered" in types:
                break
            if time.monotonic() > deadline or any(t in types for t in ("TaskFailed", "TaskCancelled")):
                raise RuntimeError(f"the running task did not get its prompt: {types}")
            await asyncio.sleep(0.2)
    await publish_replay_task(stack, events, task_id=task_id, finished=False)
    return task_id, len(types)


async def _cancel(stack: Stack, task_id: str) -> None:
    async with httpx.AsyncClient(base_url=stack.api, headers=stack.auth, timeout=30) as client:
        await client.post(f"/api/tasks/{task_id}/cancel")


def _medians(runs: list[dict[str, float | None]]) -> dict[str, Any]:
    """Each figure's median over the rounds (None if any round timed out on it)."""
    names = {name for run in runs for name in run}
    figures = {name: None if any(run.get(name) is None for run in runs)
               else round(statistics.median(run[name] for run in runs), 1) for name in sorted(names)}
    return {**figures, "rounds_ms": [{k: None if v is None else round(v, 1) for k, v in run.items()} for run in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.first_paint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000, help="events of each task (the goal: 100,000)")
    parser.add_argument("--rounds", type=int, default=3, help="page loads of each task")
    parser.add_argument("--timeout", type=float, default=300, help="seconds any one wait may take")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="baton-bench-paint-") as root:
        stack = Stack(Path(root))
        try:
            log(f"starting nats-server and baton up under {root}")
            stack.start()
            result = asyncio.run(first_paint(stack, args.events, timeout_s=args.timeout, rounds=args.rounds))
        finally:
            stack.stop()
    print(json.dumps(result, separators=(",", ":")), flush=True)


if __name__ == "__main__":
    main()
