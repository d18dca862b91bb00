"""HandoffSpans: a task's events become one trace, each span hanging from the event that caused it."""

from __future__ import annotations

from services.runtime.tracing import HandoffSpans, span_id_of, trace_id_of

TASK = "0123456789abcdef"


def event(event_id: str, kind: str, second: int, cause: str | None = None, task: str = TASK) -> dict:
    return {"event_id": event_id, "type": kind, "task_id": task, "causation_id": cause, "actor": "gateway",
            "occurred_at": f"2026-01-01T00:00:{second:02d}.000000Z", "stream_seq": second}


def test_each_span_runs_from_its_cause_to_its_event_in_the_tasks_trace():
    submitted, requested = HandoffSpans().spans_of([event("e1", "TaskSubmitted", 1),
                                                    event("e2", "WorkspaceRequested", 3, cause="e1")])
    assert submitted.parent is None and submitted.context.trace_id == trace_id_of(TASK)
    assert requested.parent.span_id == span_id_of("e1") == submitted.context.span_id
    assert requested.context.trace_id == trace_id_of(TASK)
    assert (requested.end_time - requested.start_time) == 2_000_000_000


def test_an_event_caused_by_untraced_output_hangs_from_the_outputs_own_cause():
    spans = HandoffSpans().spans_of([event("e1", "PromptDelivered", 1), event("e2", "AgentOutput", 2, cause="e1"),
                                     event("e3", "AgentFinished", 5, cause="e2")])
    assert [span.name for span in spans] == ["PromptDelivered", "AgentFinished"]
    assert spans[1].parent.span_id == span_id_of("e1")
    assert spans[1].start_time == spans[0].end_time


def test_two_tasks_are_two_traces():
    assert trace_id_of(TASK) != trace_id_of("fedcba9876543210")
