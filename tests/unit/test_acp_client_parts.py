"""The pieces of the vm_agent's ACP client that need no agent: workspace confinement of `fs/*`,
events cut to fit the bus, the `auto` permission policy."""

from __future__ import annotations

from pathlib import Path

import pytest
from acp.schema import (
    FileEditToolCallContent,
    PermissionOption,
    PromptResponse,
    ToolCallProgress,
)

from events import TOOL_CALL_TEXT_MAX_BYTES, envelope_for
from vm_agent.client_requests import choose_allow_once
from vm_agent.turn_events import fit, tool_call_updated, usage_of_response
from vm_agent.workspace_files import OutsideWorkspace, WorkspaceFiles

NATS_MAX_PAYLOAD = 1024 * 1024


@pytest.fixture
def files(tmp_path: Path) -> WorkspaceFiles:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    (tmp_path / "secret").write_text("s3cret")
    return WorkspaceFiles(workspace, Path("/workspace"))


def test_agent_paths_map_to_the_host_workspace(files: WorkspaceFiles):
    files.write_text("/workspace/a/b.txt", "one\ntwo\nthree\n")
    assert (files.host / "a" / "b.txt").read_text() == "one\ntwo\nthree\n"
    assert files.read_text("a/b.txt") == "one\ntwo\nthree\n"
    assert files.read_text(f"{files.host}/a/b.txt", line=2, limit=1) == "two\n"
    assert files.display_path("/workspace/a/b.txt") == "a/b.txt"


@pytest.mark.parametrize("path", ["/workspace/../secret", "../secret", "/etc/hostname", "/workspace2/x"])
def test_paths_outside_the_workspace_are_refused(files: WorkspaceFiles, path: str):
    with pytest.raises(OutsideWorkspace):
        files.read_text(path)
    with pytest.raises(OutsideWorkspace):
        files.write_text(path, "x")


def test_symlinks_leading_out_are_refused_and_those_inside_followed(files: WorkspaceFiles):
    (files.host / "out").symlink_to(files.host.parent)
    (files.host / "secret-link").symlink_to(files.host.parent / "secret")
    (files.host / "mine.txt").write_text("mine")
    (files.host / "mine-link").symlink_to("mine.txt")
    for path in ("out/secret", "secret-link"):
        with pytest.raises(OutsideWorkspace):
            files.read_text(path)
    with pytest.raises(OutsideWorkspace):
        files.write_text("out/new.txt", "x")
    assert not (files.host.parent / "new.txt").exists()
    assert files.read_text("mine-link") == "mine"


def test_a_tool_call_with_huge_diffs_fits_the_bus_and_says_it_was_cut():
    big = "x" * (3 * 1024 * 1024)
    update = ToolCallProgress(session_update="tool_call_update", tool_call_id="c1", status="completed", content=[
        FileEditToolCallContent(type="diff", path="/workspace/big.txt", old_text=big, new_text=big + "y"),
        FileEditToolCallContent(type="diff", path="/workspace/small.txt", old_text="a", new_text="b"),
    ])
    event = tool_call_updated(update, display=lambda p: p.removeprefix("/workspace/"), terminal_output=lambda _: None)
    size = len(envelope_for(event, task_id="0" * 16, actor="agent:x").model_dump_json())
    assert size < NATS_MAX_PAYLOAD / 4
    assert event.truncated and event.diffs[0].truncated and not event.diffs[1].truncated
    assert (event.diffs[1].old_text, event.diffs[1].new_text) == ("a", "b"), "small texts stay whole"


def test_fit_keeps_texts_within_the_budget_without_cutting_a_character():
    texts, cut = fit(["é" * 100_000, None, "short"], TOOL_CALL_TEXT_MAX_BYTES)
    assert cut and texts[1] is None and texts[2] == "short"
    assert len("".join(t or "" for t in texts).encode()) <= TOOL_CALL_TEXT_MAX_BYTES
    assert fit(["a", "b"], 10) == (["a", "b"], False)


def test_usage_comes_from_the_response_or_its_meta():
    response = PromptResponse.model_validate({"stopReason": "end_turn", "usage": {
        "inputTokens": 10, "outputTokens": 5, "totalTokens": 15, "cachedReadTokens": 3}})
    usage = usage_of_response(response)
    assert (usage.source, usage.input_tokens, usage.output_tokens, usage.total_tokens, usage.cached_read_tokens) == (
        "prompt_response", 10, 5, 15, 3)
    gemini = PromptResponse.model_validate({"stopReason": "end_turn", "_meta": {
        "quota": {"token_count": {"input_tokens": 7, "output_tokens": 2}}}})
    assert usage_of_response(gemini).model_dump(exclude_none=True) == {
        "source": "prompt_response_meta", "input_tokens": 7, "output_tokens": 2, "total_tokens": 9}
    assert usage_of_response(PromptResponse(stop_reason="end_turn")) is None


def test_the_auto_policy_allows_once_never_always():
    options = [PermissionOption(option_id="a", name="Always", kind="allow_always"),
               PermissionOption(option_id="o", name="Once", kind="allow_once")]
    assert choose_allow_once(options).option_id == "o"
    assert choose_allow_once(options[:1]) is None
