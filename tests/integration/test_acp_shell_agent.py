"""Drive the real ACP shell agent subprocess through ``start_agent_with_prompt``.

Nothing is mocked: every test spawns ``python -m vm_agent.agents.shell`` and
talks ACP to it over stdio. Every wait is bounded by a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import sys
import time
from pathlib import Path

import pytest
from acp import spawn_agent_process, text_block
from acp.schema import UserMessageChunk

from vm_agent.acp_session import AgentStartError, TurnResult, start_agent_with_prompt

REPO_ROOT = Path(__file__).resolve().parents[2]
SHELL_AGENT = [sys.executable, "-m", "vm_agent.agents.shell"]
TURN_DEADLINE_S = 30.0


def _agent_env() -> dict[str, str]:
    # The agent runs with cwd=tmp_path, so make the repo importable even when
    # the package is not installed (pytest's own sys.path tweaks don't propagate).
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath}


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class RecordingSink:
    """SessionSink that records every call in order."""

    def __init__(self, trigger: str | None = None) -> None:
        self.events: list[tuple[str, ...]] = []
        self.started = asyncio.Event()
        self.triggered = asyncio.Event()
        self._trigger = trigger

    async def agent_started(self, session_id: str) -> None:
        self.events.append(("started", session_id))
        self.started.set()

    async def prompt_delivered(self, prompt_sha256: str) -> None:
        self.events.append(("delivered", prompt_sha256))

    async def output(self, stream: str, text: str, *, continues: bool = False) -> None:
        self.events.append(("output", stream, text, *(("continues",) if continues else ())))
        if self._trigger is not None and self._trigger in text:
            self.triggered.set()

    def kinds(self, kind: str) -> list[tuple[str, ...]]:
        return [event for event in self.events if event[0] == kind]

    def text(self, stream: str) -> str:
        return "".join(event[2] for event in self.kinds("output") if event[1] == stream)


async def _run(prompt: str, cwd: Path, sink: RecordingSink, **kwargs: object) -> TurnResult:
    return await asyncio.wait_for(
        start_agent_with_prompt(SHELL_AGENT, cwd=cwd, prompt=prompt, sink=sink, env=_agent_env(), **kwargs),
        timeout=TURN_DEADLINE_S,
    )


def _assert_delivered_first(sink: RecordingSink, expected_sha: str) -> None:
    kinds = [event[0] for event in sink.events]
    assert kinds[0] == "started", sink.events
    assert sink.kinds("delivered") == [("delivered", expected_sha)], sink.events
    assert kinds.index("delivered") == 1, f"output before prompt_delivered: {sink.events}"


def _child_pids() -> set[int]:
    """PIDs whose parent is this test process (read from /proc, no psutil)."""
    me, children = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # process vanished while we looked
        if int(fields[1]) == me:
            children.add(int(stat.parent.name))
    return children


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _pids_matching(marker: str) -> set[int]:
    return {int(p.name) for p in Path("/proc").glob("[0-9]*") if marker in _cmdline(int(p.name))}


async def _until_gone(pids: set[int], deadline_s: float = 5.0) -> set[int]:
    """Poll (bounded) until none of ``pids`` exists; return the survivors."""
    end = time.monotonic() + deadline_s
    alive = set(pids)
    while alive and time.monotonic() < end:
        alive = {pid for pid in alive if Path(f"/proc/{pid}").exists()}
        if alive:
            await asyncio.sleep(0.05)
    return alive


@pytest.mark.asyncio
async def test_multiline_prompt_streams_stdout_and_stderr(tmp_path: Path) -> None:
    nonce = secrets.token_hex(8)
    prompt = (
        "set -e\n"
        f"echo 'nonce:{nonce}'\n"
        f"printf '%s\\n' '{nonce}' > marker.txt\n"
        f"echo 'warn:{nonce}' >&2\n"
        "echo done\n"
    )
    sink = RecordingSink()

    result = await _run(prompt, tmp_path, sink)

    assert result == TurnResult(stop_reason="end_turn", exit_code=0)
    _assert_delivered_first(sink, _sha256(prompt))
    assert ("output", "stdout", f"nonce:{nonce}\n") in sink.events
    assert ("output", "stderr", f"warn:{nonce}\n") in sink.events
    assert sink.text("stdout") == f"nonce:{nonce}\ndone\n"  # order kept, echo not forwarded
    assert (tmp_path / "marker.txt").read_text() == f"{nonce}\n"


@pytest.mark.asyncio
async def test_nonzero_exit_is_refusal_with_exit_code(tmp_path: Path) -> None:
    sink = RecordingSink()

    result = await _run("exit 3", tmp_path, sink)

    assert result == TurnResult(stop_reason="refusal", exit_code=3)
    _assert_delivered_first(sink, _sha256("exit 3"))
    # The script printed nothing; the agent still reports how it ended.
    assert [(e[1], e[2]) for e in sink.events if e[0] == "output"] == [("message", "bash exited with code 3\n")]


@pytest.mark.asyncio
async def test_large_output_keeps_order_and_long_lines(tmp_path: Path) -> None:
    # 300 kB in one line is far beyond asyncio's 64 KiB default stream limit.
    prompt = "seq 1 2000\nhead -c 300000 /dev/zero | tr '\\0' x\necho\necho tail"
    sink = RecordingSink()

    result = await _run(prompt, tmp_path, sink)

    assert result.stop_reason == "end_turn"
    expected = "".join(f"{i}\n" for i in range(1, 2001)) + "x" * 300000 + "\ntail\n"
    assert sink.text("stdout") == expected


@pytest.mark.asyncio
async def test_a_line_over_a_mebibyte_comes_in_pieces_each_but_its_end_marked_continues(tmp_path: Path) -> None:
    prompt = "head -c 2621440 /dev/zero | tr '\\0' y; echo\necho after"
    sink = RecordingSink()

    result = await _run(prompt, tmp_path, sink)

    assert result.stop_reason == "end_turn"
    stdout = [e for e in sink.kinds("output") if e[1] == "stdout"]
    # The line's pieces, then its end with the newline, then the next line.
    assert [e[3:] for e in stdout] == [("continues",), ("continues",), (), ()]
    assert "".join(e[2] for e in stdout[:3]) == "y" * 2621440 + "\n"
    assert stdout[3][2] == "after\n"


@pytest.mark.asyncio
async def test_withheld_prompt_never_arrives_and_agent_is_reaped(tmp_path: Path) -> None:
    sink = RecordingSink()
    before = _child_pids()
    turn = asyncio.create_task(
        start_agent_with_prompt(
            SHELL_AGENT,
            cwd=tmp_path,
            prompt="touch ran.txt",
            sink=sink,
            env=_agent_env(),
            deliver_prompt=False,
        )
    )
    await asyncio.wait_for(sink.started.wait(), timeout=TURN_DEADLINE_S)
    agents = {pid for pid in _child_pids() - before if "vm_agent.agents.shell" in _cmdline(pid)}
    assert len(agents) == 1, f"expected one agent child, got {agents}"

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(turn, timeout=1.0)

    assert turn.cancelled()
    assert sink.kinds("delivered") == [] and sink.kinds("output") == []
    assert not (tmp_path / "ran.txt").exists()
    assert await _until_gone(agents) == set(), "agent subprocess survived cancellation"


@pytest.mark.asyncio
async def test_cancelling_the_turn_kills_the_running_script(tmp_path: Path) -> None:
    marker = f"3600.{secrets.randbelow(10**9)}"  # a unique, findable sleep command line
    sink = RecordingSink(trigger="started")
    turn = asyncio.create_task(_run(f"echo started\nsleep {marker}\necho never", tmp_path, sink))
    await asyncio.wait_for(sink.triggered.wait(), timeout=TURN_DEADLINE_S)
    sleepers = _pids_matching(f"sleep {marker}")
    assert sleepers, "script's sleep process not found"

    turn.cancel()
    with pytest.raises(asyncio.CancelledError):
        await turn

    assert await _until_gone(sleepers) == set(), "script outlived the cancelled turn"
    assert "never" not in sink.text("stdout")


@pytest.mark.asyncio
async def test_agent_answers_session_cancel_with_cancelled(tmp_path: Path) -> None:
    # Protocol-level check of the agent alone, through the SDK's own client helper.
    updates: list[object] = []

    class Client:
        async def session_update(self, session_id: str, update: object, **_: object) -> None:
            updates.append(update)

    async def scenario() -> None:
        async with spawn_agent_process(Client(), *SHELL_AGENT, env=_agent_env(), cwd=tmp_path) as (conn, _proc):
            await conn.initialize(protocol_version=1)
            session = await conn.new_session(cwd=str(tmp_path), mcp_servers=[])
            script = "echo go\nsleep 30"
            prompt = asyncio.create_task(conn.prompt(session_id=session.session_id, prompt=[text_block(script)]))
            while not any(getattr(getattr(u, "content", None), "text", "") == "go\n" for u in updates):
                await asyncio.sleep(0.05)  # bounded by the outer wait_for
            await conn.cancel(session_id=session.session_id)
            response = await prompt
            assert response.stop_reason == "cancelled"
            assert response.field_meta == {"exit_code": -9}
            # The very first update is the verbatim echo of the prompt.
            assert isinstance(updates[0], UserMessageChunk) and updates[0].content.text == script

    await asyncio.wait_for(scenario(), timeout=TURN_DEADLINE_S)


@pytest.mark.asyncio
async def test_missing_agent_command_is_agent_start_error(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-agent"
    sink = RecordingSink()

    with pytest.raises(AgentStartError, match="no-such-agent"):
        await asyncio.wait_for(
            start_agent_with_prompt([str(missing)], cwd=tmp_path, prompt="true", sink=sink), timeout=TURN_DEADLINE_S
        )

    assert sink.events == []


@pytest.mark.asyncio
async def test_agent_dying_during_startup_reports_its_stderr(tmp_path: Path) -> None:
    crasher = [sys.executable, "-c", "import sys; sys.stderr.write('boom-marker\\n'); sys.exit(2)"]
    sink = RecordingSink()

    with pytest.raises(AgentStartError) as excinfo:
        await asyncio.wait_for(
            start_agent_with_prompt(crasher, cwd=tmp_path, prompt="true", sink=sink), timeout=TURN_DEADLINE_S
        )

    assert "boom-marker" in str(excinfo.value)
    assert "exit code 2" in str(excinfo.value)
    assert sink.events == []


@pytest.mark.asyncio
async def test_fast_output_arrives_one_line_per_output_even_when_lines_travel_together(tmp_path: Path) -> None:
    # Lines read together travel in one ACP message ("baton.lines"); the sink still gets lines.
    prompt = "seq -f 'ligne %g — ✓ é' 1 5000\nprintf 'no newline at the end'"
    sink = RecordingSink()

    result = await _run(prompt, tmp_path, sink)

    assert result.stop_reason == "end_turn"
    stdout = [e[2] for e in sink.events if e[0] == "output" and e[1] == "stdout"]
    assert stdout == [f"ligne {i} — ✓ é\n" for i in range(1, 5001)] + ["no newline at the end"]


async def test_line_runs_split_back_into_exactly_the_lines_read() -> None:
    from vm_agent.acp_session import _lines_of
    from vm_agent.agents.shell import _line_runs

    reader = asyncio.StreamReader()
    runs = _line_runs(reader)
    reader.feed_data("a\n".encode() + "é✓\n".encode()[:1])  # a character split across two reads
    assert await anext(runs) == ["a\n"]
    reader.feed_data("é✓\n".encode()[1:] + b"\xff\n" + b"tail")
    reader.feed_eof()
    assert [run async for run in runs] == [["é✓\n", "\ufffd\n"], ["tail"]]

    from acp.schema import AgentMessageChunk
    from acp import text_block

    chunk = AgentMessageChunk(session_update="agent_message_chunk", content=text_block("x\ny\n"),
                              field_meta={"baton.stream": "stdout", "baton.lines": 2})
    assert _lines_of(chunk, "stdout", "x\ny\n") == ["x\n", "y\n"]
    wrong = AgentMessageChunk(session_update="agent_message_chunk", content=text_block("x\ny\n"),
                              field_meta={"baton.stream": "stdout", "baton.lines": 3})
    assert _lines_of(wrong, "stdout", "x\ny\n") == ["x\ny\n"]  # Never lose text over a bad count.
    plain = AgentMessageChunk(session_update="agent_message_chunk", content=text_block("x\ny\n"))
    assert _lines_of(plain, "message", "x\ny\n") == ["x\ny\n"]  # Other agents: pieces as sent.


def test_the_shell_agent_starts_without_the_acp_sdk_or_pydantic() -> None:
    """It starts once per task (each warm pool member): importing the SDK's models was 90 % of a
    member's CPU. The SDK's client on the vm_agent's side validates what it sends (the tests above)."""
    import subprocess

    probe = "import sys, vm_agent.agents.shell; print(sorted({'acp', 'pydantic'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
