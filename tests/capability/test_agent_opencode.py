"""OpenCode does a Baton task: submitted over HTTP, run sandboxed by the real `opencode acp` against
a scripted OpenAI-compatible Chat Completions API, its tool call and usage on the stream, its file
on the pushed branch."""

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
from tests.support.fake_openai_chat import (FINAL_USAGE, MODEL, FakeOpenAIChat, ToolScript,
                                            serving_fake_openai_chat)
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import branch_file, make_origin
from tests.support.processes import BatonStack, running_stack

pytestmark = pytest.mark.capability

FILE_NAME = "nonce.txt"


@dataclass(frozen=True)
class OpenCodeTask:
    """One task OpenCode did, and everything a test may look at afterwards."""

    stack: BatonStack
    api: Api
    fake: FakeOpenAIChat
    origin: Path
    task_id: str
    prompt: str
    nonce: str
    events: list[dict]


def opencode_settings(fake: FakeOpenAIChat) -> dict[str, str]:
    """What a user sets where `baton up` runs for OpenCode on an OpenAI-compatible endpoint: the
    key, a provider in OpenCode's own config (reading the key from the environment) and the model."""
    provider = {"npm": "@ai-sdk/openai-compatible", "name": "Fake",
                "options": {"baseURL": fake.base_url, "apiKey": "{env:OPENAI_API_KEY}"},
                "models": {MODEL: {"name": "Fake coder"}}}
    return {"OPENAI_API_KEY": fake.api_key, "OPENCODE_MODEL": f"fake/{MODEL}",
            "OPENCODE_CONFIG_CONTENT": json.dumps({"provider": {"fake": provider}})}


@pytest.fixture(scope="module")
def opencode_task(tmp_path_factory: pytest.TempPathFactory,
                  installed_agents: Callable[..., Path]) -> Iterator[OpenCodeTask]:
    """A stack whose `opencode` agent talks to the fake, and one completed task of that agent."""
    root = tmp_path_factory.mktemp("opencode")
    nonce = secrets.token_hex(8)
    api_key = f"sk-proj-{secrets.token_hex(20)}"
    script = ToolScript(file_path=FILE_NAME, content=written(nonce), final_text=f"Wrote {FILE_NAME}.")
    with serving_fake_openai_chat(api_key=api_key, script=script) as fake, running_stack(
        root, env=opencode_settings(fake), agents_dir=installed_agents("opencode"),
    ) as stack:
        api = Api(stack.api, stack.token)
        origin = make_origin(root)
        prompt = f"Put the nonce {nonce} into {FILE_NAME}."
        task_id = api.submit(repo=origin.as_uri(), prompt=prompt, agent="opencode")["task_id"]
        events = assert_flow_completes(api, task_id, timeout_s=180)
        yield OpenCodeTask(stack, api, fake, origin, task_id, prompt, nonce, events)


def written(nonce: str) -> str:
    """What the scripted write puts in the file: not in the prompt, so seeing it means the tool ran."""
    return f"written by opencode: {nonce}\n"


def of_type(events: list[dict], type_name: str) -> list[dict]:
    return [event["data"] for event in events if event["type"] == type_name]


def test_opencode_does_the_task_and_its_file_is_on_the_pushed_branch(opencode_task: OpenCodeTask):
    events, nonce = opencode_task.events, opencode_task.nonce

    # Every handoff of the flow contract, each first seen in the contract's order.
    types = [e["type"] for e in events]
    assert set(FLOW_CONTRACT) <= set(types)
    assert sorted(FLOW_CONTRACT, key=types.index) == list(FLOW_CONTRACT)
    # OpenCode accepted exactly the submitted prompt, and it reached the model in the turn's call.
    [delivered] = of_type(events, "PromptDelivered")
    assert delivered["prompt_sha256"] == hashlib.sha256(opencode_task.prompt.encode()).hexdigest()
    turn_calls = [body for body in opencode_task.fake.requests if body.get("tools")]
    assert turn_calls and nonce in json.dumps(turn_calls[0]["messages"])
    assert opencode_task.fake.refused == 0
    # The model's final words are the agent's message.
    messages = "".join(o["text"] for o in of_type(events, "AgentOutput") if o["stream"] == "message")
    assert f"Wrote {FILE_NAME}." in messages
    # The file the scripted write made is on the branch the events name.
    [pushed] = of_type(events, "BranchPushed")
    assert pushed["branch"] == f"baton/{opencode_task.task_id}"
    assert branch_file(opencode_task.origin, pushed["branch"], FILE_NAME) == written(nonce).strip()
    assert opencode_task.api.wait_for_state(opencode_task.task_id, "completed")["branch"] == pushed["branch"]


def test_opencode_s_tool_call_and_usage_are_events(opencode_task: OpenCodeTask):
    events = opencode_task.events

    # The scripted write: started, running with its input (the file in the workspace), completed.
    [started] = of_type(events, "ToolCallStarted")
    assert (started["tool_call_id"], started["kind"]) == (opencode_task.fake.script.tool_call_id, "edit")
    updates = [u for u in of_type(events, "ToolCallUpdated") if u["tool_call_id"] == started["tool_call_id"]]
    assert [u["status"] for u in updates] == ["in_progress", "completed"], updates
    assert FILE_NAME in json.dumps(updates[0]["locations"])
    # OpenCode reports the turn's last model call: the tokens the fake counted for it.
    turn = [u for u in of_type(events, "UsageRecorded") if u["source"] == "prompt_response"]
    assert [(u["input_tokens"], u["output_tokens"], u["total_tokens"]) for u in turn] == [
        (FINAL_USAGE["prompt_tokens"], FINAL_USAGE["completion_tokens"],
         FINAL_USAGE["prompt_tokens"] + FINAL_USAGE["completion_tokens"])]


def test_the_api_key_is_in_no_event_log_or_store(opencode_task: OpenCodeTask):
    key = opencode_task.fake.api_key
    assert key not in json.dumps(opencode_task.events)
    assert key not in json.dumps(opencode_task.api.http.get("/api/tasks").json())
    # Nor in any file of the install: logs, stores, the agent's own home (OpenCode's database,
    # its log, its config: the key is read from the environment, never written).
    for path in opencode_task.stack.data_dir.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
