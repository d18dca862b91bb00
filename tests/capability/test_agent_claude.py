"""Claude Code does a Baton task: submitted over HTTP, run sandboxed by the real adapter against a
scripted Anthropic API, its tool call and usage on the stream, its file on the pushed branch."""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from events import FLOW_CONTRACT
from tests.capability.test_web_ui import browser, log_in, page  # noqa: F401 (fixtures)
from tests.support.api import Api
from tests.support.fake_anthropic import ClaudeScript, FakeAnthropic, running_fake_anthropic
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import branch_file, make_origin, push_file
from tests.support.processes import BatonStack, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

FILE_NAME = "nonce.txt"


@dataclass(frozen=True)
class ClaudeTask:
    """One task Claude Code did, and everything a test may look at afterwards."""

    stack: BatonStack
    api: Api
    fake: FakeAnthropic
    origin: Path
    task_id: str
    prompt: str
    nonce: str
    events: list[dict]


@pytest.fixture(scope="module")
def claude_task(tmp_path_factory: pytest.TempPathFactory,
                installed_agents: Callable[..., Path]) -> Iterator[ClaudeTask]:
    """A stack whose `claude` agent talks to the fake, and one completed task of that agent."""
    root = tmp_path_factory.mktemp("claude")
    nonce = secrets.token_hex(8)
    api_key = f"sk-ant-api03-{secrets.token_hex(16)}"
    script = ClaudeScript(file_name=FILE_NAME, file_content=written(nonce), final_text=f"Wrote {FILE_NAME}.",
                          input_tokens=1357, output_tokens=79)
    with running_fake_anthropic(api_key, script) as fake, running_stack(
        root, env={"ANTHROPIC_BASE_URL": fake.url, "ANTHROPIC_API_KEY": api_key},
        agents_dir=installed_agents("claude"),
    ) as stack:
        api = Api(stack.api, stack.token)
        origin = make_origin(root)
        prompt = f"Put the nonce {nonce} into {FILE_NAME}."
        task_id = api.submit(repo=origin.as_uri(), prompt=prompt, agent="claude")["task_id"]
        events = assert_flow_completes(api, task_id, timeout_s=180)
        yield ClaudeTask(stack, api, fake, origin, task_id, prompt, nonce, events)


def written(nonce: str) -> str:
    """What the scripted Write puts in the file: not in the prompt, so seeing it means the diff."""
    return f"written by claude: {nonce}\n"


def of_type(events: list[dict], type_name: str) -> list[dict]:
    return [event["data"] for event in events if event["type"] == type_name]


def test_claude_does_the_task_and_its_file_is_on_the_pushed_branch(claude_task: ClaudeTask):
    events, nonce = claude_task.events, claude_task.nonce

    # Every handoff of the flow contract, each first seen in the contract's order.
    types = [e["type"] for e in events]
    assert set(FLOW_CONTRACT) <= set(types)
    assert sorted(FLOW_CONTRACT, key=types.index) == list(FLOW_CONTRACT)
    # Claude Code accepted exactly the submitted prompt, and it reached the model.
    [delivered] = of_type(events, "PromptDelivered")
    assert delivered["prompt_sha256"] == hashlib.sha256(claude_task.prompt.encode()).hexdigest()
    assert claude_task.fake.saw(nonce) and claude_task.fake.refused == 0
    # The model's final words are the agent's message.
    messages = "".join(o["text"] for o in of_type(events, "AgentOutput") if o["stream"] == "message")
    assert f"Wrote {FILE_NAME}." in messages
    # The file the scripted Write made is on the branch the events name.
    [pushed] = of_type(events, "BranchPushed")
    assert pushed["branch"] == f"baton/{claude_task.task_id}"
    assert branch_file(claude_task.origin, pushed["branch"], FILE_NAME) == written(nonce).strip()
    assert claude_task.api.wait_for_state(claude_task.task_id, "completed")["branch"] == pushed["branch"]


def test_claude_s_tool_call_permission_and_usage_are_events(claude_task: ClaudeTask):
    events = claude_task.events

    # The scripted Write: started, its diff (the path relative to the workspace), completed. The
    # diff comes with the start or with an update: Claude Code may ask permission (and the adapter
    # then announce the call, input and all) before or after the call's tool_use block streams in.
    starts = of_type(events, "ToolCallStarted")
    assert len(starts) == 1 and starts[0]["kind"] == "edit", starts
    started = starts[0]
    updates = [u for u in of_type(events, "ToolCallUpdated") if u["tool_call_id"] == started["tool_call_id"]]
    diffs = [(d["path"], d["new_text"]) for update in [started, *updates] for d in update["diffs"]]
    assert (FILE_NAME, written(claude_task.nonce)) in diffs, (started, updates)
    assert updates[-1]["status"] == "completed", updates
    # Claude Code asked before writing, and Baton's policy allowed it once.
    asked, answered = of_type(events, "PermissionRequested"), of_type(events, "PermissionAnswered")
    assert len(asked) == len(answered) == 1, (asked, answered)
    assert asked[0]["tool_call_id"] == started["tool_call_id"]
    assert (answered[0]["request_id"], answered[0]["outcome"], answered[0]["by"]) == (
        asked[0]["request_id"], "selected", "policy:auto")
    # The turn's tokens are those the fake reported.
    usage = of_type(events, "UsageRecorded")
    turn = [(u["input_tokens"], u["output_tokens"]) for u in usage if u["source"] == "prompt_response"]
    assert turn == [claude_task.fake.reported_usage], (usage, len(claude_task.fake.main_turn_calls()))


def test_baton_watch_shows_claude_s_turn_as_a_conversation(claude_task: ClaudeTask):
    """`baton watch` (a real CLI process, over the WebSocket) prints the finished task's turn: the
    model's message, its tool call with its status and the size of the diff it made, the
    permission asked and how it was answered, the tokens; and exits 0 for a completed task."""
    stack = claude_task.stack
    env = {**os.environ, "BATON_API": stack.api, "BATON_DATA_DIR": str(stack.data_dir), "COLUMNS": "200"}
    env.pop("BATON_API_TOKEN", None)
    done = subprocess.run([sys.executable, "-m", "services.cli.main", "watch", claude_task.task_id],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    shown = done.stdout
    [started] = of_type(claude_task.events, "ToolCallStarted")
    assert f"⚙ {started['title']}" in shown and "completed" in shown, shown
    assert f"✎ {FILE_NAME} +1 -0" in shown, shown
    assert "? permission asked:" in shown and "by policy:auto" in shown, shown
    tokens_in, tokens_out = claude_task.fake.reported_usage
    assert f"{tokens_in:,} in · {tokens_out:,} out tokens" in shown, shown
    assert f"Wrote {FILE_NAME}." in shown, shown  # The model's closing message.


def test_the_api_key_is_in_no_event_log_or_store(claude_task: ClaudeTask):
    key = claude_task.fake.api_key
    assert key not in json.dumps(claude_task.events)
    assert key not in json.dumps(claude_task.api.http.get("/api/tasks").json())
    # Nor in what an auditor exports (`baton audit export`, every event of every task).
    stack = claude_task.stack
    env = {**os.environ, "BATON_API": stack.api, "BATON_DATA_DIR": str(stack.data_dir)}
    exported = subprocess.run([sys.executable, "-m", "services.cli.main", "audit", "export"],
                              env=env, capture_output=True, text=True, timeout=120)
    assert exported.returncode == 0 and claude_task.task_id in exported.stdout, exported.stderr
    assert key not in exported.stdout
    # Nor in any file of the install: logs, stores, the agent's own home (Claude Code keeps a
    # key's last 20 characters in ~/.claude.json once a person approves it).
    for path in claude_task.stack.data_dir.rglob("*"):
        if path.is_file():
            assert key[-20:].encode() not in path.read_bytes(), path


def test_the_task_page_shows_claude_s_tool_call_its_diff_and_tokens(claude_task: ClaudeTask, page: Page):
    # A person opens the finished task's page in Chromium.
    log_in(page, claude_task.stack, f"/tasks/{claude_task.task_id}")
    expect(page.locator("#state .badge")).to_have_text("completed", timeout=30_000)
    # The Write tool call is a card with its title, its status and the policy's answer…
    card = page.locator(".tool-call", has_text=f"Write {FILE_NAME}")
    expect(card).to_have_count(1, timeout=30_000)
    expect(card.locator(".tool-status")).to_have_text("completed")
    expect(card.locator(".tool-permission")).to_contain_text("policy:auto")
    # …with the diff it made: the new file, its line added.
    diff = card.locator(f'.diff[data-path="{FILE_NAME}"]')
    expect(diff).to_contain_text("new file")
    expect(diff.locator(".diff-add")).to_have_text(f"+{written(claude_task.nonce)}")
    # The tokens the fake reported, on the task's head.
    input_tokens, output_tokens = claude_task.fake.reported_usage
    expect(page.locator("#usage")).to_contain_text(f"{input_tokens:,} in · {output_tokens:,} out tokens")


@pytest.mark.parametrize("warm", [False, True], ids=["started_for_the_task", "kept_warm"])
def test_the_repos_claude_md_reaches_the_model_whether_claude_was_kept_warm_or_not(
        tmp_path: Path, installed_agents: Callable[..., Path], warm: bool) -> None:
    """Claude Code reads the repo's instructions (CLAUDE.md) when its session opens: a warm one is
    started ahead of its task, but its session opens only once the task's clone is in its workspace
    (opening it ahead, to save the CLI's start, was tried: the model then never saw CLAUDE.md)."""
    nonce, instruction = secrets.token_hex(8), f"house-rule-{secrets.token_hex(8)}"
    api_key = f"sk-ant-api03-{secrets.token_hex(16)}"
    script = ClaudeScript(file_name=FILE_NAME, file_content=written(nonce), final_text=f"Wrote {FILE_NAME}.",
                          input_tokens=11, output_tokens=7)
    origin = make_origin(tmp_path)
    push_file(origin, "main", "CLAUDE.md", f"# Rules of this repo\nAlways follow {instruction}.\n")
    with running_fake_anthropic(api_key, script) as fake, running_stack(
        tmp_path / "stack", env={"ANTHROPIC_BASE_URL": fake.url, "ANTHROPIC_API_KEY": api_key,
                                 "BATON_WARM_AGENTS": "claude=1" if warm else ""},
        agents_dir=installed_agents("claude"),
    ) as stack:
        api = Api(stack.api, stack.token)
        if warm:
            wait_for(lambda: api.http.get("/api/health").json()["details"]["provisioner"]["warm_vm_agents"] == 1,
                     timeout_s=120, what="a warm Claude Code")
        prompt = f"Put the nonce {nonce} into {FILE_NAME}."
        task_id = api.submit(repo=origin.as_uri(), prompt=prompt, agent="claude")["task_id"]
        events = assert_flow_completes(api, task_id, timeout_s=180)

        # Kept warm, its adapter was started before the task was assigned; its session after.
        log = (stack.data_dir / "vm_agents" / task_id / "vm_agent.log").read_text().splitlines()
        assigned = next(i for i, line in enumerate(log) if f"assigned to task {task_id}" in line)
        [agent_started] = [i for i, line in enumerate(log) if " started: [" in line and "claude-agent-acp" in line]
        [opened] = [i for i, line in enumerate(log) if " session " in line and line.endswith(" ready")]
        assert (agent_started < assigned) == warm and opened > assigned, "\n".join(log)

        assert of_type(events, "PromptDelivered")[0]["prompt_sha256"] == hashlib.sha256(prompt.encode()).hexdigest()
        assert fake.saw(nonce) and fake.saw(instruction), "the prompt and the repo's CLAUDE.md reached the model"
        assert branch_file(origin, f"baton/{task_id}", FILE_NAME) == written(nonce).strip()
