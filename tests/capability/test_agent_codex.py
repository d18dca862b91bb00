"""Codex does a Baton task: submitted over HTTP, run sandboxed by the real adapter against a
scripted OpenAI Responses API, its tool call and usage on the stream, its file on the pushed branch."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from events import FLOW_CONTRACT
from tests.support.api import Api
from tests.support.fake_openai_responses import FakeOpenAIResponses, ResponsesScript, fake_openai_responses
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import branch_file, make_origin
from tests.support.processes import BatonStack, running_stack

pytestmark = pytest.mark.capability

FILE_NAME = "nonce.txt"


@dataclass(frozen=True)
class CodexTask:
    """One task Codex did, and everything a test may look at afterwards."""

    stack: BatonStack
    api: Api
    fake: FakeOpenAIResponses
    origin: Path
    task_id: str
    prompt: str
    nonce: str
    events: list[dict]


@pytest.fixture(scope="module")
def codex_task(tmp_path_factory: pytest.TempPathFactory,
               installed_agents: Callable[..., Path]) -> Iterator[CodexTask]:
    """A stack whose `codex` agent talks to the fake, and one completed task of that agent."""
    root = tmp_path_factory.mktemp("codex")
    nonce = secrets.token_hex(8)
    api_key = f"sk-proj-{secrets.token_hex(20)}"
    script = ResponsesScript(file_name=FILE_NAME, content=nonce, final_message=f"Wrote {FILE_NAME}.",
                             input_tokens=2468, output_tokens=97)
    with fake_openai_responses(api_key=api_key, script=script) as fake, running_stack(
        root, env={"OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": api_key},
        agents_dir=installed_agents("codex"),
    ) as stack:
        api = Api(stack.api, stack.token)
        origin = make_origin(root)
        prompt = f"Put the nonce {nonce} into {FILE_NAME}."
        task_id = api.submit(repo=origin.as_uri(), prompt=prompt, agent="codex")["task_id"]
        events = assert_flow_completes(api, task_id, timeout_s=180)
        yield CodexTask(stack, api, fake, origin, task_id, prompt, nonce, events)


def of_type(events: list[dict], type_name: str) -> list[dict]:
    return [event["data"] for event in events if event["type"] == type_name]


def test_codex_does_the_task_and_its_file_is_on_the_pushed_branch(codex_task: CodexTask):
    events, nonce = codex_task.events, codex_task.nonce

    # Every handoff of the flow contract, each first seen in the contract's order.
    types = [e["type"] for e in events]
    assert set(FLOW_CONTRACT) <= set(types)
    assert sorted(FLOW_CONTRACT, key=types.index) == list(FLOW_CONTRACT)
    # Codex accepted exactly the submitted prompt, and it reached the model with the right key.
    [delivered] = of_type(events, "PromptDelivered")
    assert delivered["prompt_sha256"] == hashlib.sha256(codex_task.prompt.encode()).hexdigest()
    assert codex_task.fake.saw(nonce) and codex_task.fake.refused == 0
    # The model's final words are the agent's message.
    messages = "".join(o["text"] for o in of_type(events, "AgentOutput") if o["stream"] == "message")
    assert f"Wrote {FILE_NAME}." in messages
    # The file the scripted patch added is on the branch the events name.
    [pushed] = of_type(events, "BranchPushed")
    assert pushed["branch"] == f"baton/{codex_task.task_id}"
    assert branch_file(codex_task.origin, pushed["branch"], FILE_NAME) == nonce
    assert codex_task.api.wait_for_state(codex_task.task_id, "completed")["branch"] == pushed["branch"]


def test_codex_s_tool_call_and_usage_are_events(codex_task: CodexTask):
    events = codex_task.events

    # The scripted apply_patch: started, its diff (the path relative to the workspace), completed.
    [started] = of_type(events, "ToolCallStarted")
    assert started["kind"] == "edit"
    updates = [u for u in of_type(events, "ToolCallUpdated") if u["tool_call_id"] == started["tool_call_id"]]
    diffs = [(d["path"], d["new_text"]) for update in [started, *updates] for d in update.get("diffs") or ()]
    assert (FILE_NAME, f"{codex_task.nonce}\n") in diffs, (started, updates)
    assert updates[-1]["status"] == "completed"
    # In Baton's sandbox Codex runs its calls unasked, with no review model calls of its own.
    assert of_type(events, "PermissionRequested") == []
    assert len(codex_task.fake.responses_requests()) == 2
    # The turn's tokens: the sum of what the fake reported for its two responses.
    turn = [u for u in of_type(events, "UsageRecorded") if u["source"] == "prompt_response"]
    assert [(u["input_tokens"], u["output_tokens"]) for u in turn] == [codex_task.fake.turn_usage]


def test_the_api_key_is_in_no_event_log_or_store(codex_task: CodexTask):
    key = codex_task.fake.api_key
    assert key not in json.dumps(codex_task.events)
    assert key not in json.dumps(codex_task.api.http.get("/api/tasks").json())
    # Not in a log, a store, nor Codex's own home (its config names the variable, not the key).
    holding_it = [path for path in codex_task.stack.data_dir.rglob("*")
                  if path.is_file() and key.encode() in path.read_bytes()]
    assert holding_it == []
