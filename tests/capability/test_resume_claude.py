"""A follow-up after a Claude Code task's workspace was released: the re-provisioned workspace's
agent loads the earlier session (ACP `session/load`), so the model sees the earlier conversation."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.api import Api
from tests.support.fake_anthropic import ClaudeScript, running_fake_anthropic
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import make_origin
from tests.support.processes import running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability


def of_type(events: list[dict], event_type: str) -> list[dict]:
    return [e["data"] for e in events if e["type"] == event_type]


def test_a_follow_up_after_release_loads_claude_s_session_and_the_model_sees_turn_1(
    tmp_path: Path, installed_agents: Callable[..., Path],
):
    nonce, api_key = secrets.token_hex(8), f"sk-ant-api03-{secrets.token_hex(16)}"
    script = ClaudeScript(file_name="nonce.txt", file_content=f"written by claude: {nonce}\n")
    with running_fake_anthropic(api_key, script) as fake, running_stack(
        tmp_path / "stack", env={"ANTHROPIC_BASE_URL": fake.url, "ANTHROPIC_API_KEY": api_key,
                                 "BATON_LINGER_S": "2"},
        agents_dir=installed_agents("claude"),
    ) as stack:
        api = Api(stack.api, stack.token)
        origin = make_origin(tmp_path)
        first = f"Put the nonce {nonce} into nonce.txt."
        task = api.submit(repo=origin.as_uri(), prompt=first, agent="claude")["task_id"]
        assert_flow_completes(api, task, timeout_s=180)
        # Claude Code lingers, then leaves: the workspace is released.
        wait_for(lambda: of_type(api.events(task), "WorkspaceReleased"), timeout_s=60,
                 what="the workspace to be released after lingering")

        second = f"Now say the nonce again, follow-up {secrets.token_hex(4)}."
        sent = api.http.post(f"/api/tasks/{task}/messages", json={"prompt": second})
        assert sent.status_code == 202, sent.text
        events = assert_flow_completes(api, task, timeout_s=180, turns=2)

        # The new workspace's agent loaded turn 1's session: the same ACP session id goes on.
        first_session, restored = of_type(events, "AgentSessionStarted")
        assert restored["attempt_id"] == f"{task}-a2"
        assert (restored["resumed_from"], restored["restored"]) == (first_session["session_id"], "loaded"), restored
        assert restored["session_id"] == first_session["session_id"]
        # The model's request for turn 2 carries the conversation of turn 1 (its prompt) before it.
        turn_2 = [body for body in fake.main_turn_calls() if second in json.dumps(body["messages"])]
        assert turn_2, "no request of the model carried the follow-up"
        history = json.dumps(turn_2[0]["messages"])
        assert first in history and history.index(first) < history.index(second)
        # The history the agent replayed while loading was not recorded again: each turn's prompt
        # was delivered once, and the model's final words are output once per turn.
        assert [d.get("turn", 1) for d in of_type(events, "PromptDelivered")] == [1, 2]
        messages = [o["text"] for o in of_type(events, "AgentOutput") if o["stream"] == "message"]
        assert messages.count(f"{script.final_text}\n") + messages.count(script.final_text) == 2, messages
