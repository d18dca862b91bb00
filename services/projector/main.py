"""Composition root of the projector process."""

from __future__ import annotations

from eventsourcing.persistence import Tracking

from events import Envelope
from projections.task_board import PROJECTED_TYPES
from services.projector.read_models import open_audit_log, open_task_board
from services.runtime.bus import StreamLimits, open_bus
from services.runtime.nats_auth import service_credentials
from services.runtime.consumer import ALL_EVENTS, Subscription, consume, run_all
from services.runtime.heartbeat import send_heartbeats
from services.runtime.service import replica_of
from services.runtime.settings import Settings

NAME = "projector"


async def run(settings: Settings) -> None:
    board = open_task_board(settings)
    audit = open_audit_log(settings)

    async def project(envelope: Envelope, tracking: Tracking) -> None:
        board.apply(envelope, tracking)

    async def project_batch(items: list[tuple[Envelope, Tracking]]) -> None:
        board.apply_batch(items)

    async def append_to_audit_log(envelope: Envelope, tracking: Tracking) -> None:
        audit.append(envelope, tracking)

    async def append_batch_to_audit_log(items: list[tuple[Envelope, Tracking]]) -> None:
        audit.append_batch(items)

    async with open_bus(settings.nats_url, name=NAME, credentials=service_credentials(settings, NAME),
                       stream_limits=StreamLimits.from_settings(settings)) as bus:
        replica = replica_of(settings)
        await run_all(
            send_heartbeats(bus.nc, NAME, faults=settings.faults),
            # The audit log follows every event in stream order, through one consumer.
            consume(bus, service=NAME, store=audit, replica=replica, subscription=Subscription(
                ALL_EVENTS, append_to_audit_log, append_batch_to_audit_log)),
            # The board takes each task's events in order, a partition at a time.
            consume(bus, service=NAME, store=board, replica=replica, subscription=[
                Subscription(event_type, project, project_batch) for event_type in PROJECTED_TYPES]),
        )
