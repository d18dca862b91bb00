"""`/metrics`: Prometheus text format, behind the API token like the rest of the API.

What the stream says (handoff latencies, gaps, usage, notifications) is folded in from the audit
log, up to its end, at each scrape; what is true now (tasks by state, consumer lag, backlog, dead
letters, viewers, the vm_agent pool) is read at each scrape from where it lives: each relaying
service's backlog from its last heartbeat, the gateway's own from its store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from events import STREAM
from projections.audit_log import MAX_PAGE
from projections.task_board import STATES
from services.gateway.context import Gateway, GatewayDep
from services.runtime.bus import dead_letter_count
from services.runtime.metrics import StreamMetrics

router = APIRouter(tags=["system"])
NATS_TIMEOUT_S = 2.0


@router.get("/metrics")
async def metrics(gateway: GatewayDep, request: Request) -> Response:
    """Every Baton metric, in the Prometheus text exposition format."""
    stream: StreamMetrics = request.app.state.stream_metrics
    await asyncio.to_thread(stream.catch_up, lambda after: gateway.audit.query(after_seq=after, limit=MAX_PAGE))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(stream.registry)
    registry.register(NowCollector(await now_readings(gateway)))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


async def now_readings(gateway: Gateway) -> dict[str, Any]:
    """What holds right now; a reading NATS could not give is left out (the scrape still answers)."""
    pool = gateway.heartbeats.details.get("provisioner", {})
    readings: dict[str, Any] = {
        "tasks": await asyncio.to_thread(tasks_by_state, gateway),
        "viewers": gateway.viewers.in_use,
        "relay_backlog": relay_backlogs(gateway),
        "vm_agents": {"warm": pool.get("warm_vm_agents", 0), "starting": pool.get("vm_agents_starting", 0)},
        "waiting_for_vm_agent": pool.get("tasks_waiting_for_a_vm_agent", 0),
    }
    try:
        readings["dead_letters"] = await asyncio.wait_for(dead_letter_count(gateway.bus.js), NATS_TIMEOUT_S)
        readings["lag"] = await asyncio.wait_for(consumer_lag(gateway), NATS_TIMEOUT_S)
    except Exception:  # NATS down or slow: /api/health says so; the rest is still worth scraping.
        pass
    return readings


def tasks_by_state(gateway: Gateway) -> dict[str, int]:
    return dict.fromkeys(STATES, 0) | gateway.board.count_by_state()


def relay_backlogs(gateway: Gateway) -> dict[str, int]:
    """Events recorded and not yet published, per service: the gateway's own outbox read now, every
    other relaying service's as its last heartbeat reported it (none for a service not heard from lately)."""
    alive = gateway.heartbeats.status()
    reported = {service: details["relay_backlog"] for service, details in gateway.heartbeats.details.items()
                if alive.get(service) and isinstance(details.get("relay_backlog"), int)}
    return reported | {"gateway": gateway.relay.backlog()}


async def consumer_lag(gateway: Gateway) -> dict[str, int]:
    """Messages not yet delivered to each service's consumers (num_pending), summed per service."""
    lag: dict[str, int] = {}
    for info in await gateway.bus.js.consumers_info(STREAM):
        service = (info.config.durable_name or info.name).rsplit("-", 1)[0]  # <service>-p<k>, <service>-all
        lag[service] = lag.get(service, 0) + (info.num_pending or 0)
    return lag


class NowCollector(Collector):
    """Gauges of one scrape's readings."""

    def __init__(self, readings: dict[str, Any]) -> None:
        self.readings = readings

    def collect(self) -> Iterator[GaugeMetricFamily]:
        r = self.readings
        yield _by("baton_tasks", "Tasks by state (the task board).", "state", r["tasks"])
        yield GaugeMetricFamily("baton_websocket_viewers", "Live WebSocket viewers.", value=r["viewers"])
        yield _by("baton_relay_backlog_events", "Events recorded, not yet published.", "service",
                  r["relay_backlog"])
        yield _by("baton_vm_agents", "vm_agents in the warm pool by state.", "state", r["vm_agents"])
        yield GaugeMetricFamily("baton_tasks_waiting_for_vm_agent", "Tasks waiting for a vm_agent.",
                                value=r["waiting_for_vm_agent"])
        if "dead_letters" in r:
            yield GaugeMetricFamily("baton_dead_letters", "Messages set aside in the dead-letter stream.",
                                    value=r["dead_letters"])
        if "lag" in r:
            yield _by("baton_consumer_lag_events", "Events not yet delivered to a service's consumers.",
                      "service", r["lag"])


def _by(name: str, documentation: str, label: str, values: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family
