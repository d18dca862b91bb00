"""Real agents' start: submit → `PromptDelivered` per agent kind, beside the adapter's own start-up.

For each real kind (its pinned adapter, against the scripted fake model servers of the tests,
so no network and no key): a stack whose warm pool keeps one agent of every kind ready; tasks
submitted one at a time (each waits for its end, so the pool refills between them), timed from
the POST to the `PromptDelivered` the vm_agent recorded. Beside it, in the same run, the
adapter started alone as the vm_agent starts it (sandboxed, its kind's environment, ACP
`initialize`), timed to ready: what a task would wait without the warm pool.

    .venv/bin/python -m bench.agents [--tasks 3] [--kinds claude,codex,gemini,opencode]

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from tests.support.agents import install_agents
from tests.support.fake_anthropic import ClaudeScript, running_fake_anthropic
from tests.support.fake_gemini import running_fake_gemini
from tests.support.fake_openai_chat import ToolScript, serving_fake_openai_chat
from tests.support.fake_openai_responses import ResponsesScript, fake_openai_responses
from tests.support.git_remote import make_origin
from tests.support.processes import running_stack
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


def _seconds(occurred_at: str) -> float:
    return datetime.fromisoformat(occurred_at).timestamp()


def submit_to_prompt(api: str, headers: dict[str, str], repo: str, kind: str, tasks: int) -> list[float]:
    """Seconds from each POST to its PromptDelivered, one task at a time, each run to its end."""
    latencies = []
    with httpx.Client(base_url=api, headers=headers, timeout=30) as client:
        for i in range(tasks):
            sent = time.time()
            response = client.post("/api/tasks", json={"repo": repo, "agent": kind, "prompt": f"write {FILE} ({i})"})
            response.raise_for_status()
            task_id = response.json()["task_id"]
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                events = client.get(f"/api/tasks/{task_id}/events").json()["events"]
                if any(e["type"] in ("TaskCompleted", "TaskFailed") for e in events):
                    break
                time.sleep(0.2)
            delivered = [e for e in events if e["type"] == "PromptDelivered"]
            if not delivered:
                raise RuntimeError(f"{kind}: task {task_id} never delivered its prompt: {[e['type'] for e in events]}")
            latencies.append(_seconds(delivered[0]["occurred_at"]) - sent)
    return latencies


async def adapter_start_alone(kind: str, agents_dir: Path, settings: dict[str, str], runs: int) -> list[float]:
    """Seconds from spawning the kind's adapter (sandboxed, as a vm_agent does) to ACP ready."""
    backend = BACKENDS[kind]
    took = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="baton-bench-agent-", dir="/var/tmp") as root:
            workspace, home = Path(root) / "workspace", Path(root) / "home"
            workspace.mkdir()
            launcher = AgentLauncher(Sandbox.from_setting("auto", hidden=()), home, agents_dir)
            environ_before = dict(__import__("os").environ)
            __import__("os").environ.update(settings)
            try:
                started = time.monotonic()
                agent = await launcher.start(backend, workspace=workspace)
                took.append(time.monotonic() - started)
                await agent.close()
            finally:
                __import__("os").environ.clear()
                __import__("os").environ.update(environ_before)
    return took


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"p50_ms": round(1000 * statistics.median(ordered), 1), "max_ms": round(1000 * ordered[-1], 1),
            "n": len(ordered)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench.agents", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3, help="tasks per kind")
    parser.add_argument("--kinds", default=",".join(KINDS))
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    agents_dir = install_agents(*kinds)
    key = f"sk-bench-{secrets.token_hex(12)}"
    result: dict[str, Any] = {"kinds": {}}
    with tempfile.TemporaryDirectory(prefix="baton-bench-agents-") as root, fake_models(key) as settings:
        for kind in kinds:
            alone = asyncio.run(adapter_start_alone(kind, agents_dir, settings, runs=args.tasks))
            result["kinds"][kind] = {"adapter_start_alone": summary(alone)}
        warm = ",".join(["shell=1", *(f"{kind}=1" for kind in kinds)])
        with running_stack(Path(root), env={**settings, "BATON_WARM_AGENTS": warm}, agents_dir=agents_dir) as stack:
            origin = make_origin(Path(root))
            for kind in kinds:
                latencies = submit_to_prompt(stack.api, stack.auth, origin.as_uri(), kind, args.tasks)
                result["kinds"][kind]["submit_to_prompt"] = summary(latencies)
    print(f"{'kind':<10}{'submit→PromptDelivered p50':>28}{'max':>10}{'adapter alone p50':>20}{'max':>10}")
    for kind, figures in result["kinds"].items():
        sub, alone = figures["submit_to_prompt"], figures["adapter_start_alone"]
        print(f"{kind:<10}{sub['p50_ms']:>25.0f} ms{sub['max_ms']:>7.0f} ms{alone['p50_ms']:>17.0f} ms"
              f"{alone['max_ms']:>7.0f} ms")
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
