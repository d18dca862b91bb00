"""The contract `vm_agent.agents.import_acp_cheaply` relies on: the pinned pydantic still has the
two private hooks it sets, and an ACP agent built after it still speaks ACP (every message it
sends validates and serializes as before). Run in a fresh interpreter: the hooks change the
process they run in."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.support.processes import REPO_ROOT

PROBE = r"""
import json, time
from pydantic._internal import _config, _fields
assert hasattr(_fields, "extract_docstrings_from_cls"), "pydantic dropped extract_docstrings_from_cls"
assert _config.config_defaults.get("defer_build") is False, "pydantic dropped config_defaults['defer_build']"
started = time.process_time()
from vm_agent.agents import import_acp_cheaply
import_acp_cheaply()
assert _config.config_defaults["defer_build"] is True
from acp import PROTOCOL_VERSION, InitializeResponse, PromptResponse
from acp.schema import AgentMessageChunk, SessionNotification, TextContentBlock
cpu_s = time.process_time() - started
update = SessionNotification(session_id="s", update=AgentMessageChunk(
    session_update="agent_message_chunk", content=TextContentBlock(type="text", text="hi\n")))
print(json.dumps({
    "cpu_s": cpu_s,
    "update": update.model_dump(mode="json", by_alias=True, exclude_none=True),
    "init": InitializeResponse(protocol_version=PROTOCOL_VERSION).model_dump(by_alias=True, exclude_none=True),
    "prompt": PromptResponse.model_validate({"stopReason": "end_turn"}).stop_reason,
}))
"""


def test_acp_still_speaks_acp_after_the_import_shortcut():
    out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["update"] == {"sessionId": "s", "update": {
        "sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": "hi\n"}}}
    assert got["init"]["protocolVersion"] >= 1
    assert got["prompt"] == "end_turn"
