"""OpenCode, started as Baton starts the `opencode` kind, does a turn against a scripted model.

The real `opencode acp` (`opencode-ai`, pinned by the kind) talks the OpenAI Chat Completions API,
through its `@ai-sdk/openai-compatible` provider, to `tests/support/fake_openai_chat.py`; the
vm_agent's own ACP client drives it. No network: the fake is on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.fake_anthropic import ClaudeScript, running_fake_anthropic
from tests.support.fake_openai_chat import FINAL_USAGE, MODEL, FakeOpenAIChat, ToolScript, serving_fake_openai_chat
from tests.support.waiting import wait_for
from vm_agent.acp_session import TurnResult, start_agent_with_prompt
from vm_agent.backends import AGENT_KINDS
from vm_agent.sandbox import agent_environment

OPENCODE = AGENT_KINDS["opencode"]
TURN_DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def agents_dir(installed_agents: Callable[..., Path]) -> Path:
    """The machine-wide agents dir, with the pinned OpenCode installed (once per machine)."""
    return installed_agents("opencode")


def opencode_settings(fake: FakeOpenAIChat) -> dict[str, str]:
    """What a user sets for OpenCode on an OpenAI-compatible endpoint: the key, a provider in
    OpenCode's own config (reading the key from the environment, never holding it) and the model."""
    provider = {"npm": "@ai-sdk/openai-compatible", "name": "Fake",
                "options": {"baseURL": fake.base_url, "apiKey": "{env:OPENAI_API_KEY}"},
                "models": {MODEL: {"name": "Fake coder"}}}
    return {"OPENAI_API_KEY": fake.api_key, "OPENCODE_MODEL": f"fake/{MODEL}",
            "OPENCODE_CONFIG_CONTENT": json.dumps({"provider": {"fake": provider}})}


class RecordingSink:
    """A SessionSink that keeps every call, in order."""

    def __init__(self) -> None:
        self.delivered: list[str] = []
        self.outputs: list[tuple[str, str]] = []
        self.reports: list[object] = []

    async def agent_started(self, session_id: str) -> None:
        pass

    async def prompt_delivered(self, prompt_sha256: str) -> None:
        self.delivered.append(prompt_sha256)

    async def output(self, stream: str, text: str, *, continues: bool = False) -> None:
        self.outputs.append((stream, text))

    async def report(self, event: object) -> None:
        self.reports.append(event)

    def reported(self, type_name: str) -> list[dict]:
        return [event.model_dump() for event in self.reports if type(event).__name__ == type_name]


async def _run_opencode(agents_dir: Path, settings: dict[str, str], *, workspace: Path, home: Path, prompt: str,
                        sink: RecordingSink) -> TurnResult:
    """Start the `opencode` kind as the vm_agent does outside a sandbox: its declared variables
    taken from the environment (with the user's `settings`), its fixed ones added, its `prepare`
    hook run."""
    environ = {**os.environ, **settings}
    env = OPENCODE.environment(home, {**agent_environment(environ, OPENCODE.env), "HOME": str(home)})
    return await asyncio.wait_for(
        start_agent_with_prompt(OPENCODE.command_in(agents_dir), cwd=workspace, prompt=prompt, sink=sink, env=env),
        timeout=TURN_DEADLINE_S)


@contextmanager
def _dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    workspace, home = tmp_path / "workspace", tmp_path / "home"
    workspace.mkdir()
    home.mkdir()
    yield workspace, home


@pytest.mark.asyncio
async def test_opencode_writes_the_scripted_file_and_reports_its_tool_call_and_usage(
    agents_dir: Path, tmp_path: Path,
) -> None:
    nonce = secrets.token_hex(8)
    prompt = f"Write the nonce {nonce} into nonce.txt"
    api_key = f"sk-fake-{secrets.token_hex(12)}"
    script = ToolScript(file_path="nonce.txt", content=f"{nonce}\n", final_text=f"Done {nonce}.")
    sink = RecordingSink()

    with _dirs(tmp_path) as (workspace, home), serving_fake_openai_chat(api_key=api_key, script=script) as fake:
        result = await _run_opencode(agents_dir, opencode_settings(fake), workspace=workspace, home=home,
                                     prompt=prompt, sink=sink)

    assert result.stop_reason == "end_turn"
    # The prompt reached the model (in the turn that offers tools), with the key; nothing refused.
    assert sink.delivered == [hashlib.sha256(prompt.encode()).hexdigest()]
    assert any(nonce in json.dumps(body["messages"]) for body in fake.requests if body.get("tools"))
    assert fake.refused == 0
    # The scripted write ran in the workspace; the model's last words came back as the message.
    assert (workspace / "nonce.txt").read_text() == f"{nonce}\n"
    assert "".join(text for stream, text in sink.outputs if stream == "message") == f"Done {nonce}."
    _assert_the_write_was_reported(sink, script)
    # OpenCode reports the turn's last model call: the tokens the fake counted for it.
    usage = [u for u in sink.reported("UsageRecorded") if u["source"] == "prompt_response"]
    assert [(u["input_tokens"], u["output_tokens"]) for u in usage] == [
        (FINAL_USAGE["prompt_tokens"], FINAL_USAGE["completion_tokens"])]
    # The key reached the model and nothing else.
    assert api_key not in json.dumps([repr(e) for e in sink.reports] + sink.outputs)
    # Nothing of OpenCode outlives its turn (its process group is gone within moments).
    wait_for(lambda: not _processes_with_home(home), timeout_s=5, what="OpenCode's processes to end")


def _processes_with_home(home: Path) -> list[str]:
    """The command lines of the processes whose HOME is `home` (this run's agent and its children)."""
    marker = f"HOME={home}".encode()
    lines = []
    for process in Path("/proc").glob("[0-9]*"):
        try:
            if marker in (process / "environ").read_bytes().split(b"\0"):
                lines.append((process / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue  # It ended while we looked, or is not ours to read.
    return lines


def _assert_the_write_was_reported(sink: RecordingSink, script: ToolScript) -> None:
    [started] = sink.reported("ToolCallStarted")
    assert (started["tool_call_id"], started["kind"]) == (script.tool_call_id, "edit")
    updates = [u for u in sink.reported("ToolCallUpdated") if u["tool_call_id"] == script.tool_call_id]
    assert [u["status"] for u in updates] == ["in_progress", "completed"], updates


@pytest.mark.asyncio
async def test_opencode_reaches_nothing_but_the_model_api(agents_dir: Path, tmp_path: Path) -> None:
    # Every other host it would call (models.dev, the npm registry for its plugin package, its
    # own updates) goes through this proxy, which answers nothing: with the kind's settings it is
    # never asked.
    proxy_requests: list[bytes] = []

    async def note_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proxy_requests.append(await reader.readline())
        writer.close()

    proxy = await asyncio.start_server(note_request, "127.0.0.1", 0)
    proxy_url = f"http://127.0.0.1:{proxy.sockets[0].getsockname()[1]}"
    proxied = {"HTTPS_PROXY": proxy_url, "HTTP_PROXY": proxy_url, "NO_PROXY": "127.0.0.1"}
    try:
        with _dirs(tmp_path) as (workspace, home), \
                serving_fake_openai_chat(api_key="sk-fake", script=ToolScript("a.txt", "a\n")) as fake:
            result = await _run_opencode(agents_dir, {**opencode_settings(fake), **proxied}, workspace=workspace,
                                         home=home, prompt="write a.txt", sink=RecordingSink())
    finally:
        proxy.close()

    assert result.stop_reason == "end_turn"
    assert proxy_requests == []
    # Its state stayed in its private home; the workspace holds only the file it wrote.
    assert sorted(p.name for p in workspace.iterdir()) == ["a.txt"]
    assert (home / ".local" / "share" / "opencode").is_dir()


@pytest.mark.asyncio
async def test_opencode_on_claude_code_s_variables_reaches_the_anthropic_api_where_claude_code_would(
    agents_dir: Path, tmp_path: Path,
) -> None:
    # The same ANTHROPIC_BASE_URL (without /v1) serves the `claude` and the `opencode` kinds.
    nonce = secrets.token_hex(8)
    api_key = f"sk-ant-fake-{secrets.token_hex(12)}"
    sink = RecordingSink()
    with _dirs(tmp_path) as (workspace, home), \
            running_fake_anthropic(api_key, ClaudeScript("a.txt", "a\n", final_text="unused")) as fake:
        settings = {"ANTHROPIC_API_KEY": api_key, "ANTHROPIC_BASE_URL": fake.url,
                    "OPENCODE_MODEL": "anthropic/claude-sonnet-4-5"}
        result = await _run_opencode(agents_dir, settings, workspace=workspace, home=home,
                                     prompt=f"Say hello {nonce}", sink=sink)

    assert result.stop_reason == "end_turn"
    assert {request.path for request in fake.requests} == {"/v1/messages"}
    assert fake.saw(nonce) and fake.refused == 0
    assert [stream for stream, _ in sink.outputs] == ["message"]
