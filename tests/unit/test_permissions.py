"""Permission requests a person answers (the `ask` policy): the vm_agent's waiting future and its
timeout, the policy in the client, the gateway's checks of an answer, the monitor and the board
showing a task that waits for a person."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from acp.schema import PermissionOption, ToolCallUpdate
from eventsourcing.persistence import Tracking

from events import (
    DEADLINES,
    Envelope,
    PermissionAnswered,
    PermissionAnswerGiven,
    PermissionRequested,
    TaskSubmitted,
    WorkspaceReady,
    envelope_for,
    parse_deadlines,
)
from projections.sql import SQLiteDatabase
from projections.task_board import TaskBoard
from services.gateway.permissions import AnswerRefused, check_answer
from services.monitor.handlers import Monitor
from services.task_runner.handlers import TaskRunnerHandlers
from tests.unit.fakes import FakeLookup, FakeStarter, envelopes_in, popo_store
from vm_agent.client_requests import ClientRequests
from vm_agent.permissions import PermissionDesk
from vm_agent.workspace_files import WorkspaceFiles

OPTIONS = [PermissionOption(option_id="always", name="Always", kind="allow_always"),
           PermissionOption(option_id="once", name="Once", kind="allow_once"),
           PermissionOption(option_id="no", name="Reject", kind="reject_once")]
CALL = ToolCallUpdate(tool_call_id="c1", title="Write a.txt")


def client(tmp_path: Path, desk: PermissionDesk | None) -> tuple[ClientRequests, list]:
    recorded: list = []
    return ClientRequests(WorkspaceFiles(tmp_path, tmp_path), None, recorded.append, desk), recorded


async def asked(requests: ClientRequests, recorded: list) -> asyncio.Task:
    """The agent's request, waiting, once its PermissionRequested is recorded."""
    waiting = asyncio.create_task(requests.request_permission(CALL, OPTIONS))
    while not recorded:
        await asyncio.sleep(0)
    return waiting


# ----------------------------------------------------------------------------- the vm_agent


async def test_the_auto_policy_answers_at_once_without_a_person(tmp_path: Path):
    requests, recorded = client(tmp_path, None)
    response = await requests.request_permission(CALL, OPTIONS)
    assert response.outcome.option_id == "once"
    assert [(type(e).__name__, getattr(e, "by", None)) for e in recorded] == [
        ("PermissionRequested", None), ("PermissionAnswered", "policy:auto")]


async def test_under_ask_the_agent_waits_for_the_persons_answer_without_blocking(tmp_path: Path):
    desk = PermissionDesk(timeout_s=30)
    requests, recorded = client(tmp_path, desk)
    waiting = await asked(requests, recorded)
    # Recorded and waiting; the loop runs on (this test does) and nothing is answered yet.
    assert isinstance(recorded[0], PermissionRequested) and recorded[0].request_id == "1"
    await asyncio.sleep(0.01)
    assert not waiting.done() and len(recorded) == 1

    assert desk.answer("1", "maybe") == "not_offered"
    assert desk.answer("2", "once") == "unknown"
    assert desk.answer("1", "no") == "answered"
    assert desk.answer("1", "no") == "already"  # The task runner may hand it over twice.
    assert desk.answer("1", "once") == "closed"

    response = await waiting
    assert response.outcome.option_id == "no"
    assert recorded[1] == PermissionAnswered(request_id="1", option_id="no", outcome="selected", by="user")


async def test_an_unanswered_request_is_rejected_after_the_timeout_saying_so(tmp_path: Path):
    requests, recorded = client(tmp_path, PermissionDesk(timeout_s=0.05))
    response = await requests.request_permission(CALL, OPTIONS)
    assert response.outcome.option_id == "no"
    answered = recorded[1]
    assert (answered.option_id, answered.outcome, answered.by) == ("no", "selected", "timeout")
    assert "0.05s" in answered.reason
    # Too late for a person now.
    assert requests._permissions.answer("1", "once") == "closed"


async def test_without_a_reject_option_a_timed_out_request_is_cancelled(tmp_path: Path):
    requests, recorded = client(tmp_path, PermissionDesk(timeout_s=0.01))
    response = await requests.request_permission(CALL, OPTIONS[:2])
    assert response.outcome.outcome == "cancelled"
    assert (recorded[1].option_id, recorded[1].outcome, recorded[1].by) == (None, "cancelled", "timeout")


# ----------------------------------------------------------------------------- the gateway


def request(request_id: str = "1", answer: dict | None = None) -> dict:
    return {"request_id": request_id, "title": "Write a.txt", "answer": answer,
            "options": [{"option_id": o.option_id, "name": o.name, "kind": o.kind} for o in OPTIONS]}


@pytest.mark.parametrize(("requests", "given", "request_id", "option", "status"), [
    ([], {}, "1", "once", 404),
    ([request()], {}, "2", "once", 404),
    ([request()], {}, "1", "maybe", 422),
    ([request(answer={"option_id": "no", "by": "timeout", "reason": "nobody answered"})], {}, "1", "once", 409),
    ([request()], {"1": "no"}, "1", "once", 409),
])
def test_the_gateway_refuses_an_answer_that_cannot_be_taken(requests, given, request_id, option, status):
    with pytest.raises(AnswerRefused) as refused:
        check_answer(requests, given, request_id, option)
    assert refused.value.status == status


def test_the_gateway_takes_a_new_answer_once_and_a_repeat_quietly():
    assert check_answer([request()], {}, "1", "once") is True
    assert check_answer([request()], {"1": "once"}, "1", "once") is False


# ----------------------------------------------------------------------------- monitor and board

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)
_seq = itertools.count(1)


async def observe(m: Monitor, event_type: str, seconds: float, **data) -> None:
    envelope = Envelope(type=event_type, task_id="t1", actor="test", occurred_at=T0 + timedelta(seconds=seconds),
                        data=data)
    await m.on_event(envelope, Tracking(f"monitor-{event_type}", next(_seq)))


async def test_a_task_waiting_for_a_person_is_neither_stalled_nor_overdue():
    m = Monitor(popo_store(), parse_deadlines("AgentOutput=20", DEADLINES), stall_after_s=10)
    await observe(m, "PromptDelivered", 0, session_id="s", prompt_sha256="x")
    await observe(m, "PermissionRequested", 1, request_id="1")
    m.tick(T0 + timedelta(seconds=300))
    assert envelopes_in(m.store) == [] and m.waiting_for_person("t1")

    # Answered after 5 minutes: the clocks run again from the answer, not from before the wait.
    await observe(m, "PermissionAnswered", 301, request_id="1")
    m.tick(T0 + timedelta(seconds=305))
    assert envelopes_in(m.store) == [] and not m.waiting_for_person("t1")
    m.tick(T0 + timedelta(seconds=312))
    assert [e.type for e in envelopes_in(m.store)] == ["AgentStalled"]


async def test_a_deadline_counts_the_flows_time_not_the_persons():
    m = Monitor(popo_store(), parse_deadlines("AgentOutput=20", DEADLINES), stall_after_s=1000)
    await observe(m, "PromptDelivered", 0, session_id="s", prompt_sha256="x")
    await observe(m, "PermissionRequested", 1, request_id="1")
    await observe(m, "PermissionAnswered", 301, request_id="1")
    m.tick(T0 + timedelta(seconds=315))  # 15 s of the flow's own time
    assert envelopes_in(m.store) == []
    m.tick(T0 + timedelta(seconds=322))
    assert [e.type for e in envelopes_in(m.store)] == ["StepOverdue"]


async def test_an_answer_folded_before_its_request_opens_no_wait():
    m = Monitor(popo_store(), parse_deadlines("AgentOutput=20", DEADLINES), stall_after_s=10)
    await observe(m, "PromptDelivered", 0, session_id="s", prompt_sha256="x")
    await observe(m, "PermissionAnswered", 2, request_id="1")
    await observe(m, "PermissionRequested", 1, request_id="1")
    assert not m.waiting_for_person("t1")


def test_the_board_says_a_task_waits_for_a_person_until_answered(tmp_path: Path):
    board = TaskBoard(SQLiteDatabase(tmp_path / "board.sqlite"))
    try:
        seq = itertools.count(1)

        def feed(type_: str, **data) -> None:
            envelope = Envelope(type=type_, task_id="t1", actor="x", data=data, occurred_at=T0)
            board.apply(envelope, Tracking(f"projector-{type_}", next(seq)))

        feed("TaskSubmitted", repo="file:///r", agent="scripted", prompt="p", base_branch=None,
             permission_policy="ask")
        feed("PermissionRequested", request_id="1", tool_call_id="c1", title="Write a.txt", options=[])
        assert board.get("t1")["waiting_for"] == "person"
        assert [(t["permission_policy"], t["waiting_for"]) for t in board.list()] == [("ask", "person")]
        feed("PermissionAnswered", request_id="1", option_id="once", outcome="selected", by="user")
        assert board.get("t1")["waiting_for"] is None
        # A task that ends while asking waits for nobody.
        feed("PermissionRequested", request_id="2", tool_call_id="c2", title="Run make", options=[])
        assert board.get("t1")["waiting_for"] == "person"
        feed("TaskFailed", reason="the vm_agent was lost")
        assert board.get("t1")["waiting_for"] is None
    finally:
        board.close()


# ----------------------------------------------------------------------------- the task runner


async def test_the_task_runner_starts_an_ask_task_so_and_hands_a_persons_answer_to_its_vm_agent():
    store, starter = popo_store(), FakeStarter()
    handlers = TaskRunnerHandlers(store, starter, FakeLookup()).handlers()
    positions = itertools.count(1)
    for given in (TaskSubmitted(repo="file:///r", prompt="p", agent="scripted", permission_policy="ask"),
                  WorkspaceReady(workspace_id="w", provider="local", vm_agent_url="http://vm:1"),
                  PermissionAnswerGiven(request_id="1", option_id="once")):
        envelope = envelope_for(given, task_id="t1", actor="test")
        await handlers[envelope.type](envelope, Tracking(f"task-runner-{envelope.type}", next(positions)))

    started, answered = starter.calls
    assert started["permission_policy"] == "ask"
    assert answered == {"answer_to": "http://vm:1", "task_id": "t1", "request_id": "1", "option_id": "once",
                        "token_expires_at": None}
