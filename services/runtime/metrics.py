"""Metrics computed from the event stream: handoff latencies, flow gaps, usage, notifications,
cloud VMs by state.

`StreamMetrics` folds envelopes (as the audit log holds them, in stream order) into Prometheus
counters and histograms of its own registry. Labels are event types, agent kinds, outcomes:
never a task id, so their number stays bounded.
"""

from __future__ import annotations

from collections import OrderedDict
import threading
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
REMEMBERED_EVENTS = 50_000
"""How many recent events' times are kept to time the handoffs they cause (bounds the memory)."""
REMEMBERED_TASKS = 50_000
VM_STATES = ("requested", "created", "connected")
"""A cloud VM's states, in order: its server asked for, created (booting), its vm_agent connected."""


class BoundedDict(OrderedDict):
    """A dict that forgets its oldest entries past `limit`."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        if len(self) > self.limit:
            self.popitem(last=False)


class StreamMetrics:
    """Counters and histograms that move as events are folded in with `observe`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.position = 0
        """The stream sequence of the last event folded in."""
        self._times: BoundedDict = BoundedDict(REMEMBERED_EVENTS)  # event_id -> (type, occurred_at)
        self._submitted: BoundedDict = BoundedDict(REMEMBERED_TASKS)  # task_id -> (agent, occurred_at)
        self._session_cost: BoundedDict = BoundedDict(REMEMBERED_TASKS)  # task_id -> cumulative cost
        self._servers: BoundedDict = BoundedDict(REMEMBERED_TASKS)  # (task_id, attempt) -> (provider, state)
        self._catching_up = threading.Lock()
        r = self.registry
        self.handoff = Histogram(
            "baton_handoff_seconds", "Time from an event to the event it caused (one handoff).",
            ["from_event", "to_event"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.prompt_delivery = Histogram(
            "baton_task_prompt_delivery_seconds",
            "Time from a task's TaskSubmitted to its first PromptDelivered.",
            ["agent"], buckets=LATENCY_BUCKETS_S, registry=r)
        self.events = Counter("baton_events_total", "Events seen on the stream, by type.", ["type"], registry=r)
        self.gaps = Counter("baton_flow_gaps_total", "Flow gaps: an expected event overdue after another.",
                            ["expected", "after"], registry=r)
        self.tokens = Counter("baton_agent_tokens_total", "Tokens agents reported (UsageRecorded).",
                              ["agent", "direction"], registry=r)
        self.cost = Counter("baton_agent_cost_total", "Cost agents reported, in its currency.",
                            ["agent", "currency"], registry=r)
        self.notifications = Counter("baton_notifications_total", "Webhook notifications by outcome.",
                                     ["outcome"], registry=r)
        self.vms = Gauge("baton_vms", "Cloud VMs (servers) not yet deleted, by provider and state.",
                         ["provider", "state"], registry=r)

    def catch_up(self, read_after: Callable[[int], list[dict[str, Any]]]) -> None:
        """Fold in every record `read_after(stream_seq)` gives past `position`, page by page (one
        caller at a time: two scrapes at once never fold an event twice)."""
        with self._catching_up:
            while records := read_after(self.position):
                self.observe_all(records)

    def observe_all(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Fold in audit-log records (envelopes with their `stream_seq`), in stream order."""
        for record in records:
            self.observe(record)
            self.position = max(self.position, record.get("stream_seq", self.position))

    def observe(self, envelope: Mapping[str, Any]) -> None:
        """Fold in one envelope (as JSON: `type`, `task_id`, `event_id`, `occurred_at`, `data`)."""
        kind, at = envelope["type"], _time(envelope["occurred_at"])
        self.events.labels(kind).inc()
        cause = self._times.get(envelope.get("causation_id"))
        if cause is not None:
            self.handoff.labels(cause[0], kind).observe(max(0.0, (at - cause[1]).total_seconds()))
        self._times[envelope["event_id"]] = (kind, at)
        folder = _FOLDERS.get(kind)
        if folder is not None:
            folder(self, envelope, at)

    def _agent_of(self, task_id: str) -> str:
        return self._submitted.get(task_id, ("unknown",))[0]

    def _on_submitted(self, envelope: Mapping[str, Any], at: datetime) -> None:
        self._submitted[envelope["task_id"]] = (envelope["data"].get("agent") or "unknown", at)

    def _on_prompt_delivered(self, envelope: Mapping[str, Any], at: datetime) -> None:
        submitted = self._submitted.get(envelope["task_id"])
        if submitted is not None and envelope["data"].get("turn", 1) == 1:
            self.prompt_delivery.labels(submitted[0]).observe(max(0.0, (at - submitted[1]).total_seconds()))

    def _on_gap(self, envelope: Mapping[str, Any], at: datetime) -> None:
        data = envelope["data"]
        if envelope["type"] == "AgentStalled":
            self.gaps.labels("AgentOutput", "AgentOutput").inc()
        else:
            self.gaps.labels(data["expected"], data["after"]).inc()

    def _on_usage(self, envelope: Mapping[str, Any], at: datetime) -> None:
        data, agent = envelope["data"], self._agent_of(envelope["task_id"])
        for direction in ("input", "output"):
            if data.get(f"{direction}_tokens"):
                self.tokens.labels(agent, direction).inc(data[f"{direction}_tokens"])
        if data.get("cost_amount") is not None:
            # The agent reports the session's cumulative cost: count what it grew by.
            seen = self._session_cost.get(envelope["task_id"], 0.0)
            if data["cost_amount"] > seen:
                self.cost.labels(agent, data.get("cost_currency") or "unknown").inc(data["cost_amount"] - seen)
                self._session_cost[envelope["task_id"]] = data["cost_amount"]

    def _on_notification(self, envelope: Mapping[str, Any], at: datetime) -> None:
        self.notifications.labels("delivered" if envelope["type"] == "NotificationDelivered" else "failed").inc()

    def _on_server(self, envelope: Mapping[str, Any], at: datetime) -> None:
        """A cloud server's lifecycle moves it between `VM_STATES`; deleted, it is counted no more.
        A server asked for but never created (the workspace failed) is no more either."""
        data, kind = envelope["data"], envelope["type"]
        key = (envelope["task_id"], data.get("attempt", 1))
        known = self._servers.pop(key, None)
        if known is not None:
            self.vms.labels(*known).dec()
        provider = data.get("provider") or (known[0] if known else None)
        state = _SERVER_STATES.get(kind)
        if state is not None and provider is not None:
            for each in VM_STATES:  # Every state of a provider seen is a series, 0 when none.
                self.vms.labels(provider, each)
            self._servers[key] = (provider, state)
            self.vms.labels(provider, state).inc()

    def _on_workspace_failed(self, envelope: Mapping[str, Any], at: datetime) -> None:
        for key in [key for key, (_, state) in self._servers.items()
                    if key[0] == envelope["task_id"] and state == "requested"]:
            self.vms.labels(*self._servers.pop(key)).dec()


_SERVER_STATES = {"ServerRequested": "requested", "ServerCreated": "created", "VmAgentConnected": "connected"}

_FOLDERS = {
    "TaskSubmitted": StreamMetrics._on_submitted,
    "PromptDelivered": StreamMetrics._on_prompt_delivered,
    "StepOverdue": StreamMetrics._on_gap,
    "AgentStalled": StreamMetrics._on_gap,
    "UsageRecorded": StreamMetrics._on_usage,
    "NotificationDelivered": StreamMetrics._on_notification,
    "NotificationFailed": StreamMetrics._on_notification,
    "ServerRequested": StreamMetrics._on_server,
    "ServerCreated": StreamMetrics._on_server,
    "VmAgentConnected": StreamMetrics._on_server,
    "ServerDeleted": StreamMetrics._on_server,
    "WorkspaceFailed": StreamMetrics._on_workspace_failed,
}


def _time(value: str | datetime) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value.replace("Z", "+00:00"))
