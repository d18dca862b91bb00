"""Real agents' start: submit → `PromptDelivered` per agent kind, beside the adapter's own start-up.

For each real kind (its pinned adapter, against the scripted fake model servers of the tests,
so no network and no key): a stack whose warm pool keeps one agent of every kind ready, and the
shell agent's figures measured the same way (`bench.pipeline.submit_to_prompt`): one task in
flight (each waits for its end, so the pool refills between them), then `--concurrency` at a
time (each worker POSTs, waits for `PromptDelivered`, POSTs the next), timed from the POST to
the `PromptDelivered` the vm_agent recorded, split by handoff (`pipeline.STAGES`). Beside it, in
the same run, the adapter started alone as the vm_agent starts it (sandboxed, its kind's
environment, ACP `initialize`), timed to ready: what a task would wait without the warm pool.

    .venv/bin/python -m bench.agents [--tasks 3] [--kinds claude,codex,gemini,opencode] [--concurrency 1,5]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


from bench import pipeline
from bench.stack import Stack, wait_until_pool_warm
from tests.support.agents import install_agents
from tests.support.fake_anthropic import ClaudeScript, running_fake_anthropic
from tests.support.fake_gemini import running_fake_gemini
from tests.support.fake_openai_chat import ToolScript, serving_fake_openai_chat
from tests.support.fake_openai_responses import ResponsesScript, fake_openai_responses
from tests.support.git_remote import make_origin
from tests.support.processes import BatonStack, NatsServer
from vm_agent.backends import BACKENDS
from vm_agent.runner import AgentLauncher
from vm_agent.sandbox import Sandbox

KINDS = ("claude", "codex", "gemini", "opencode")
FILE = "bench.txt"


@contextlib.contextmanager
def fake_models(key: str) -> Iterator[dict[str, str]]:
    """Every fake model server, and the settings (where `baton up` runs) that point each kind at its own."""
    chat_script = ToolScript(file_path=FILE, content="opencode\n")
    with running_fake_anthropic(key, ClaudeScript(file_name=FILE, file_content="claude\n")) as anthropic, \
            fake_openai_responses(api_key=key, script=ResponsesScript(file_name=FILE, content="codex\n")) as responses, \
            running_fake_gemini(api_key=key, file_path=FILE, file_content="gemini\n") as gemini, \
            serving_fake_openai_chat(api_key=key, script=chat_script) as chat:
        provider = {"npm": "@ai-sdk/openai-compatible", "name": "Fake",
                    "options": {"baseURL": chat.base_url, "apiKey": "{env:OPENAI_API_KEY}"},
                    "models": {"fake-coder": {"name": "Fake coder"}}}
        yield {
            "ANTHROPIC_BASE_URL": anthropic.url, "ANTHROPIC_API_KEY": key,
            "OPENAI_BASE_URL": responses.base_url, "OPENAI_API_KEY": key,
            "GOOGLE_GEMINI_BASE_URL": gemini.url, "GEMINI_API_KEY": key,
            "OPENCODE_MODEL": "fake/fake-coder",
            "OPENCODE_CONFIG_CONTENT": json.dumps({"provider": {"fake": provider}}),
        }


async def submit_to_prompt(stack: Stack, kind: str, tasks: int, concurrency: int) -> dict[str, Any]:
    """`pipeline.submit_to_prompt` for `kind`: one in flight runs each task to its end (the pool
    refills between them); more at a time waits only for each PromptDelivered."""
    await wait_until_pool_warm(stack, timeout_s=120)
    return await pipeline.submit_to_prompt(stack, tasks, concurrency=concurrency, until_end=concurrency == 1,
                                           timeout_s=60 + 30 * tasks, agent=kind)


async def adapter_start_alone(kind: str, agents_dir: Path, settings: dict[str, str], runs: int) -> list[float]:
    """Seconds from spawning the kind's adapter (sandboxed, as a vm_agent does) to ACP ready."""
    backend = BACKENDS[kind]
    took = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="baton-bench-agent-", dir="/var/tmp") as root:
            workspace, home = Path(root) / "workspace", Path(root) / "home"
            workspace.mkdir()
            launcher = AgentLauncher(Sandbox.from_setting("auto", hidden=()), home, agents_dir)
            environ_before = dict(os.environ)
            os.environ.update(settings)
            try:
                started = time.monotonic()
                agent = await launcher.start(backend, workspace=workspace)
                took.append(time.monotonic() - started)
                await agent.close()
            finally:
                os.environ.clear()
                os.environ.update(environ_before)
    return took


@contextlib.contextmanager
def stack_with(root: Path, env: dict[str, str], agents_dir: Path | None) -> Iterator[Stack]:
    """`bench.stack.Stack` (its NATS open to the benchmark's own readers) with `env` for `baton up`
    (agent keys only reach it this way); stopped, and whatever it left ended, on exit."""
    if agents_dir is not None:
        env = {**env, "BATON_AGENTS_DIR": str(agents_dir)}
    stack = Stack(root, origin=make_origin(root))
    try:
        stack.nats = NatsServer(store_dir=root / "nats").start()
        stack.baton = BatonStack(nats=stack.nats, data_dir=stack.data_dir, extra_env=env)
        stack.baton.start()
        yield stack
    finally:
        stack.stop()


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50_ms": round(1000 * statistics.median(ordered), 1), "max_ms": round(1000 * ordered[-1], 1),
            "n": len(ordered)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.agents", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3, help="tasks per kind and concurrency")
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--concurrency", default="1", help="tasks at a time, one run each: 1,5")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    agents_dir = install_agents(*kinds)
    key = f"sk-bench-{secrets.token_hex(12)}"
    result: dict[str, Any] = {"kinds": {}}
    with tempfile.TemporaryDirectory(prefix="baton-bench-agents-") as root, fake_models(key) as settings:
        for kind in kinds:
            alone = asyncio.run(adapter_start_alone(kind, agents_dir, settings, runs=args.tasks))
            result["kinds"][kind] = {"adapter_start_alone": summary(alone), "submit_to_prompt": {}}
        warm = ",".join(["shell=1", *(f"{kind}=1" for kind in kinds)])
        with stack_with(Path(root), {**settings, "BATON_WARM_AGENTS": warm}, agents_dir) as stack:
            for kind in kinds:
                for concurrency in concurrencies:
                    figures = asyncio.run(submit_to_prompt(stack, kind, args.tasks, concurrency))
                    result["kinds"][kind]["submit_to_prompt"][str(concurrency)] = figures
    print_table(result)
    print(json.dumps(result))


def print_table(result: dict[str, Any]) -> None:
    print(f"{'kind':<10}{'at a time':>10}{'submit→PromptDelivered p50':>28}{'p99':>10}{'adapter alone p50':>20}"
          f"{'max':>10}  stage p50 (ms)")
    for kind, figures in result["kinds"].items():
        alone = figures["adapter_start_alone"]
        for concurrency, sub in figures["submit_to_prompt"].items():
            stages = ", ".join(f"{gap.split('->')[1]} {ms:.0f}" for gap, ms in sub["stage_p50_ms"].items())
            print(f"{kind:<10}{concurrency:>10}{sub['p50_ms']:>25.0f} ms{sub['p99_ms']:>7.0f} ms"
                  f"{alone['p50_ms']:>17.0f} ms{alone['max_ms']:>7.0f} ms  {stages}")


if __name__ == "__main__":
    sys.exit(main())
