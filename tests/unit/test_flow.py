"""check_flow: the handoffs of a successful task, in order."""

from __future__ import annotations

from events import FLOW_CONTRACT, check_flow

COMPLETE = [
    "TaskSubmitted", "WorkspaceRequested", "WorkspaceReady", "AgentSessionStarted",
    "PromptDelivered", "AgentOutput", "AgentFinished", "BranchPushed", "TaskCompleted",
]


def test_a_complete_flow_is_ok_and_described_as_complete():
    report = check_flow(COMPLETE)
    assert report.ok
    assert report.missing == ()
    assert report.out_of_order == ()
    assert report.first_gap is None
    assert report.reached == FLOW_CONTRACT
    assert report.describe() == "flow complete: " + " → ".join(FLOW_CONTRACT)


def test_a_flow_that_stops_before_prompt_delivered_names_it_as_the_first_gap():
    report = check_flow(COMPLETE[:4])
    assert not report.ok
    assert report.first_gap == "PromptDelivered"
    assert report.missing == (
        "PromptDelivered", "AgentOutput", "AgentFinished", "BranchPushed", "TaskCompleted"
    )
    assert report.describe() == "missing handoff PromptDelivered (after AgentSessionStarted)"


def test_a_flow_missing_only_prompt_delivered_still_reports_it_as_the_first_gap():
    report = check_flow([t for t in COMPLETE if t != "PromptDelivered"])
    assert report.first_gap == "PromptDelivered"
    assert report.missing == ("PromptDelivered",)
    assert "missing handoff PromptDelivered" in report.describe()


def test_describe_names_the_handoff_just_before_a_gap_in_the_middle_of_the_flow():
    report = check_flow([t for t in COMPLETE if t != "AgentOutput"])
    assert report.describe() == "missing handoff AgentOutput (after PromptDelivered)"


def test_an_empty_stream_is_missing_everything_after_nothing():
    report = check_flow([])
    assert report.reached == ()
    assert report.first_gap == "TaskSubmitted"
    assert report.describe() == "missing handoff TaskSubmitted (after nothing)"


def test_a_handoff_first_seen_before_the_one_it_follows_is_out_of_order():
    events = list(COMPLETE)
    events[1], events[2] = events[2], events[1]  # WorkspaceReady before WorkspaceRequested
    report = check_flow(events)
    assert report.missing == ()
    assert report.out_of_order == ("WorkspaceReady",)
    assert not report.ok
    assert report.describe() == "out of order: WorkspaceReady"


def test_many_agent_outputs_and_unrelated_events_do_not_break_a_complete_flow():
    events = COMPLETE[:5] + ["AgentOutput"] * 50 + ["SessionFailed"] + COMPLETE[6:]
    report = check_flow(events)
    assert report.ok
    assert report.reached == FLOW_CONTRACT


def test_a_repeated_earlier_event_late_in_the_stream_is_not_out_of_order():
    report = check_flow(COMPLETE + ["WorkspaceReady", "AgentOutput"])
    assert report.ok


def test_check_flow_accepts_a_generator():
    assert check_flow(t for t in COMPLETE).ok
