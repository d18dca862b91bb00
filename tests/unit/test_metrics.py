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


def test_cloud_vms_are_counted_by_provider_and_state_through_their_lifecycle():
    metrics = StreamMetrics()

    def vms() -> dict[str, float]:
        return {dict(labels)["state"]: value for (name, labels), value in samples(metrics).items()
                if name == "baton_vms" and dict(labels)["provider"] == "hetzner"}

    metrics.observe_all([
        event(1, "ServerRequested", 0, task="t1", provider="hetzner", name="baton-t1", server_type="cx22",
              locations=["fsn1"], attempt=1),
        event(2, "ServerRequested", 1, task="t2", provider="hetzner", name="baton-t2", server_type="cx22",
              locations=["fsn1"], attempt=1),
    ])
    assert vms() == {"requested": 2, "created": 0, "connected": 0}
    metrics.observe_all([
        event(3, "ServerCreated", 30, task="t1", provider="hetzner", server_id=7, server_type="cx22",
              location="fsn1", attempt=1),
        event(4, "VmAgentConnected", 40, task="t1", workspace_id="t1-1", version="1", attempt=1),
        event(5, "WorkspaceFailed", 41, task="t2", reason="no room"),  # asked for, never created
    ])
    assert vms() == {"requested": 0, "created": 0, "connected": 1}
    # A new attempt's server is another VM; the first one's deletion leaves only it.
    metrics.observe_all([
        event(6, "ServerRequested", 50, task="t1", provider="hetzner", name="baton-t1-2", server_type="cx22",
              locations=["fsn1"], attempt=2),
        event(7, "ServerDeleted", 60, task="t1", provider="hetzner", server_id=7, reason="lost", seconds=30,
              attempt=1),
    ])
    assert vms() == {"requested": 1, "created": 0, "connected": 0}
    assert not any("t1" in str(labels) for name, labels in samples(metrics) if name == "baton_vms")
