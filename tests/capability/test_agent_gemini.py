"""A task for Gemini CLI goes the whole way, offline: the real adapter (`gemini --acp`, pinned),
sandboxed as Baton runs every agent, talks the Gemini API to a scripted fake on 127.0.0.1
(tests/support/fake_gemini.py) that asks it to write a file, and the file comes back on the branch.

What a user observes is asserted through the public interface: the flow contract, the prompt's
hash, the tool call with its permission and diff, the tokens the model reported; and that the API
key reached the model and nothing else (no event, no log, no store).
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from events import FLOW_CONTRACT
from tests.support.api import Api
from tests.support.fake_gemini import FINAL_TEXT, THOUGHT_TEXT, FakeGemini, running_fake_gemini
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import branch_commit, branch_file, make_origin
from tests.support.processes import BatonStack, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

TASK_DEADLINE_S = 180


@pytest.mark.parametrize("warm_agents", ["", "gemini=1"], ids=["started_for_the_task", "kept_warm"])
def test_a_gemini_task_writes_the_scripted_file_and_reports_its_turn(
    tmp_path: Path, installed_agents: Callable[..., Path], warm_agents: str,
) -> None:
    nonce = secrets.token_hex(8)
    api_key = f"AIza-test-{secrets.token_hex(12)}"
    prompt = f"Write hello.txt with a greeting. Nonce: {nonce}"
    content = f"hello from gemini {nonce}\n"
    origin = make_origin(tmp_path)

    with running_fake_gemini(api_key=api_key, file_path="hello.txt", file_content=content) as fake, \
            running_stack(tmp_path / "stack", agents_dir=installed_agents("gemini"),
                          env={"GEMINI_API_KEY": api_key, "GOOGLE_GEMINI_BASE_URL": fake.url,
                               "BATON_WARM_AGENTS": warm_agents}) as stack:
        api = Api(stack.api, stack.token)
        if warm_agents:  # The task then takes a vm_agent whose Gemini CLI is already up.
            wait_for(lambda: _pool(api)["warm_vm_agents"] == 1, timeout_s=90, what="a warm Gemini CLI")

        # A user submits a task for Gemini CLI; every handoff of the flow follows, in order.
        task = api.submit(repo=origin.as_uri(), prompt=prompt, agent="gemini")
        events = assert_flow_completes(api, task["task_id"], timeout_s=TASK_DEADLINE_S)
        types = [e["type"] for e in events]
        assert [t for t in FLOW_CONTRACT if t in types] == list(FLOW_CONTRACT)

        # The agent accepted exactly the submitted prompt, and it reached the model.
        delivered = _the(events, "PromptDelivered")
        assert delivered["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
        assert fake.saw(nonce), [r.path for r in fake.requests]
        assert all(r.api_key == api_key for r in fake.requests)

        _assert_the_write_was_allowed_once_and_completed(events, content)
        _assert_thought_and_message(events)
        _assert_usage_is_what_the_model_reported(events, fake)

        # The file the model asked for is on the pushed branch, at the commit the events name.
        branch = f"baton/{task['task_id']}"
        pushed = _the(events, "BranchPushed")
        assert branch_file(origin, branch, "hello.txt") == content.strip()
        assert branch_commit(origin, branch) == pushed["commit"]

        # Kept warm, the task's Gemini CLI is the one its vm_agent started before it was assigned;
        # started for the task, it starts after.
        assert _agent_started_before_assignment(stack, task["task_id"]) == bool(warm_agents)

        # The key went to the model and nowhere else Baton writes.
        assert api_key not in json.dumps(api.events(task["task_id"]))
        assert not _files_holding(stack, api_key), "the API key was written under the data dir"


def _pool(api: Api) -> dict:
    return api.http.get("/api/health").json()["details"]["provisioner"]


def _agent_started_before_assignment(stack: BatonStack, task_id: str) -> bool:
    """Whether the task's vm_agent started its one Gemini CLI before it was assigned the task (its
    log: `agent pid N started: [... .bin/gemini --acp]`, `assigned to task`)."""
    log = (stack.data_dir / "vm_agents" / task_id / "vm_agent.log").read_text()
    lines = log.splitlines()
    assigned = next(i for i, line in enumerate(lines) if f"assigned to task {task_id}" in line)
    started = [i for i, line in enumerate(lines)
               if "agent pid " in line and " started: [" in line and "/.bin/gemini" in line]
    assert len(started) == 1, log
    return started[0] < assigned


def _the(events: list[dict], type_: str) -> dict:
    found = [e["data"] for e in events if e["type"] == type_]
    assert len(found) == 1, f"expected one {type_}: {[(e['type'], e['data']) for e in events]}"
    return found[0]


def _assert_the_write_was_allowed_once_and_completed(events: list[dict], content: str) -> None:
    """Gemini CLI asks before writing; Baton's policy answers "allow once" (in its untrusted folder
    "allow always" would fail the write); the call ends completed, with the diff it made."""
    types = [e["type"] for e in events]
    requested, answered = _the(events, "PermissionRequested"), _the(events, "PermissionAnswered")
    kinds = {option["option_id"]: option["kind"] for option in requested["options"]}
    assert answered["request_id"] == requested["request_id"]
    assert (answered["outcome"], kinds[answered["option_id"]], answered["by"]) == ("selected", "allow_once", "policy:auto")

    # Gemini CLI sends no `tool_call` for a call it asks about: the request names the call, then
    # its update says it completed, with its kind and the diff it made (shown relative to the workspace).
    call_id = requested["tool_call_id"]
    assert all(e["data"]["tool_call_id"] == call_id for e in events if e["type"] == "ToolCallStarted")
    updates = [e["data"] for e in events if e["type"] == "ToolCallUpdated" and e["data"]["tool_call_id"] == call_id]
    assert updates and (updates[-1]["status"], updates[-1]["kind"]) == ("completed", "edit"), updates
    diffs = [diff for data in updates for diff in data["diffs"]]
    assert any(diff["path"] == "hello.txt" and diff["new_text"] == content for diff in diffs), diffs

    # In the order they happened: asked, answered, done, then the turn ended.
    done = next(i for i, e in enumerate(events) if e["type"] == "ToolCallUpdated" and e["data"]["status"] == "completed")
    assert (types.index("PromptDelivered") < types.index("PermissionRequested") < types.index("PermissionAnswered")
            < done < types.index("AgentFinished")), types


def _assert_thought_and_message(events: list[dict]) -> None:
    outputs = [e["data"] for e in events if e["type"] == "AgentOutput"]
    assert THOUGHT_TEXT in "".join(o["text"] for o in outputs if o["stream"] == "thought")
    assert FINAL_TEXT in "".join(o["text"] for o in outputs if o["stream"] == "message")
    assert [o["seq"] for o in outputs] == list(range(1, len(outputs) + 1))


def _assert_usage_is_what_the_model_reported(events: list[dict], fake: FakeGemini) -> None:
    """Gemini CLI adds up its model calls' token counts in the turn's response (`_meta.quota`)."""
    usage = [e["data"] for e in events if e["type"] == "UsageRecorded"]
    assert usage, [e["type"] for e in events]
    calls = fake.replies_with_usage
    assert (usage[-1]["input_tokens"], usage[-1]["output_tokens"]) == (
        calls * fake.usage.prompt_tokens, calls * fake.usage.candidates_tokens), usage


def _files_holding(stack: BatonStack, text: str) -> list[Path]:
    """Files under the stack's data dir (logs, stores, workspaces, agents' homes) holding `text`."""
    needle = text.encode()
    return [path for path in stack.data_dir.rglob("*")
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes()]
