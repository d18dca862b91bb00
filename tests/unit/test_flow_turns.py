"""check_flow judges every turn of a conversation in order, each with its own contract."""

from __future__ import annotations

from events import DEADLINES, FLOW_CONTRACT, check_flow, parse_deadlines
from events.flow import REPROVISIONED_TURN_CONTRACT, TURN_CONTRACT, Deadline, deadlines_for_turn


def envelope(event_type: str, **data) -> dict:
    return {"type": event_type, "data": data}


def first_turn() -> list[dict]:
    return [envelope(step) for step in FLOW_CONTRACT]


def lingering_turn(turn: int, *, without: str = "") -> list[dict]:
    steps = [envelope("TurnRequested", turn=turn, follow_up_id="f", reprovision=False),
             envelope("PromptDelivered", turn=turn), envelope("AgentOutput"), envelope("AgentFinished"),
             envelope("BranchPushed"), envelope("TaskCompleted", turn=turn)]
    return [e for e in steps if e["type"] != without]


def test_a_conversation_of_three_turns_is_complete_and_described_turn_by_turn():
    report = check_flow(first_turn() + lingering_turn(2) + lingering_turn(3))
    assert report.ok
    assert [t.contract for t in report.turns] == [FLOW_CONTRACT, TURN_CONTRACT, TURN_CONTRACT]
    assert report.reached[-1] == "TaskCompleted (turn 3)"
    assert report.describe().startswith("flow complete: TaskSubmitted")
    assert "; turn 2: TurnRequested → PromptDelivered" in report.describe()


def test_a_follow_ups_missing_push_is_named_with_its_turn():
    report = check_flow(first_turn() + lingering_turn(2, without="BranchPushed"))
    assert not report.ok
    assert report.first_gap == "BranchPushed (turn 2)"
    assert report.describe() == "missing handoff BranchPushed (after AgentFinished) in turn 2"


def test_a_follow_up_whose_prompt_never_came_misses_everything_after_its_request():
    events = first_turn() + lingering_turn(2)[:1]
    report = check_flow(events)
    assert report.turns[0].ok
    assert report.missing[0] == "PromptDelivered (turn 2)"


def test_the_first_turns_handoffs_do_not_stand_in_for_a_later_turns():
    # Bare types: turn 2 begins at its TurnRequested, so turn 1's AgentOutput is not turn 2's.
    types = [*FLOW_CONTRACT, "TurnRequested", "PromptDelivered", "AgentFinished", "BranchPushed", "TaskCompleted"]
    assert check_flow(types).first_gap == "AgentOutput (turn 2)"


def test_a_turns_prompt_published_before_its_request_is_still_that_turns_and_in_order():
    turn_2 = lingering_turn(2)
    turn_2[0], turn_2[1] = turn_2[1], turn_2[0]  # The vm_agent's PromptDelivered reached the bus first.
    assert check_flow(first_turn() + turn_2).ok


def test_a_late_completion_of_an_earlier_turn_stays_that_turns():
    events = first_turn()[:-1] + lingering_turn(2)[:2] + [first_turn()[-1]] + lingering_turn(2)[2:]
    report = check_flow(events)
    assert report.ok, report.describe()


def test_a_reprovisioned_turn_must_show_the_whole_workspace_path():
    turn_2 = [envelope("TurnRequested", turn=2, follow_up_id="f", reprovision=True),
              *[envelope(step) for step in FLOW_CONTRACT[1:-1] if step != "PromptDelivered"]]
    turn_2.insert(4, envelope("PromptDelivered", turn=2))
    turn_2.append(envelope("TaskCompleted", turn=2))
    assert check_flow(first_turn() + turn_2).ok
    without_session = [e for e in turn_2 if e["type"] != "AgentSessionStarted"]
    report = check_flow(first_turn() + without_session)
    assert report.turns[1].contract == REPROVISIONED_TURN_CONTRACT
    assert report.first_gap == "AgentSessionStarted (turn 2)"


def test_a_single_turn_task_reads_exactly_as_before_turns_existed():
    report = check_flow([e["type"] for e in first_turn()])
    assert report.reached == FLOW_CONTRACT and len(report.turns) == 1


def test_a_lingering_turn_runs_the_same_deadlines_from_its_request():
    deadlines = parse_deadlines("PromptDelivered=7", DEADLINES)
    assert deadlines_for_turn(deadlines, 2, reprovisioned=False) == (
        Deadline("PromptDelivered", "TurnRequested", 7), Deadline("AgentOutput", "PromptDelivered", 120),
        Deadline("BranchPushed", "AgentFinished", 60), Deadline("TaskCompleted", "BranchPushed", 30))


def test_a_reprovisioned_turn_runs_every_deadline_its_workspace_request_following_the_turns_request():
    turn_deadlines = deadlines_for_turn(DEADLINES, 3, reprovisioned=True)
    assert turn_deadlines[0] == Deadline("WorkspaceRequested", "TurnRequested", 30)
    assert turn_deadlines[1:] == DEADLINES[1:]
    assert deadlines_for_turn(DEADLINES, 1, reprovisioned=False) == DEADLINES
