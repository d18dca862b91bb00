"""StreamMetrics: the counters and histograms a task's events move, with bounded labels."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from services.runtime.metrics import StreamMetrics

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def event(seq: int, kind: str, at_s: float, *, cause: str | None = None, task: str = "a" * 16, **data) -> dict:
    return {"stream_seq": seq, "event_id": f"e{seq}", "task_id": task, "type": kind, "causation_id": cause,
            "occurred_at": (T0 + timedelta(seconds=at_s)).isoformat().replace("+00:00", "Z"), "data": data}


def samples(metrics: StreamMetrics) -> dict[tuple[str, tuple], float]:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_task_path_times_its_handoffs_and_its_prompt_delivery_without_task_ids_in_labels():
    metrics = StreamMetrics()
    metrics.observe_all([
        event(1, "TaskSubmitted", 0, agent="claude"),
        event(2, "WorkspaceRequested", 0.5, cause="e1"),
        event(3, "PromptDelivered", 3, cause="e2"),
    ])
    got = samples(metrics)
    assert got[("baton_task_prompt_delivery_seconds_count", (("agent", "claude"),))] == 1
    assert got[("baton_task_prompt_delivery_seconds_sum", (("agent", "claude"),))] == 3
    handoff = (("from_event", "WorkspaceRequested"), ("to_event", "PromptDelivered"))
    assert got[("baton_handoff_seconds_sum", handoff)] == 2.5
    assert got[("baton_events_total", (("type", "TaskSubmitted"),))] == 1
    assert metrics.position == 3
    assert not any("a" * 16 in str(labels) for _, labels in got)


def test_gaps_usage_and_notifications_are_counted_by_their_bounded_labels():
    metrics = StreamMetrics()
    metrics.observe_all([
        event(1, "TaskSubmitted", 0, agent="codex"),
        event(2, "StepOverdue", 60, expected="PromptDelivered", after="WorkspaceReady", waited_s=60),
        event(3, "AgentStalled", 70, silent_s=30),
        event(4, "UsageRecorded", 80, source="prompt_response", input_tokens=100, output_tokens=20),
        event(5, "UsageRecorded", 81, source="usage_update", cost_amount=0.5, cost_currency="USD"),
        event(6, "UsageRecorded", 82, source="usage_update", cost_amount=0.75, cost_currency="USD"),
        event(7, "NotificationDelivered", 90),
        event(8, "NotificationFailed", 91),
    ])
    got = samples(metrics)
    assert got[("baton_flow_gaps_total", (("after", "WorkspaceReady"), ("expected", "PromptDelivered")))] == 1
    assert got[("baton_flow_gaps_total", (("after", "AgentOutput"), ("expected", "AgentOutput")))] == 1
    assert got[("baton_agent_tokens_total", (("agent", "codex"), ("direction", "input")))] == 100
    assert got[("baton_agent_tokens_total", (("agent", "codex"), ("direction", "output")))] == 20
    # The cost is cumulative per session: counted once, as its growth.
    assert got[("baton_agent_cost_total", (("agent", "codex"), ("currency", "USD")))] == 0.75
    assert got[("baton_notifications_total", (("outcome", "delivered"),))] == 1
    assert got[("baton_notifications_total", (("outcome", "failed"),))] == 1


def test_catching_up_reads_page_by_page_from_its_position_and_folds_each_event_once():
    log = [event(seq, "TaskQueued", seq) for seq in range(1, 6)]
    metrics = StreamMetrics()

    def read_after(after: int) -> list[dict]:
        return [record for record in log if record["stream_seq"] > after][:2]

    metrics.catch_up(read_after)
    metrics.catch_up(read_after)  # nothing new: nothing folded again
    assert samples(metrics)[("baton_events_total", (("type", "TaskQueued"),))] == 5
    assert metrics.position == 5
