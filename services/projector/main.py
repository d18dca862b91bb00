"""Composition root of the projector process."""

from __future__ import annotations

from services.projector.handlers import Projector
from services.projector.read_models import open_audit_log, open_task_board
from services.runtime.bus import StreamLimits, open_bus
from services.runtime.consumer import Subscription, run_all
from services.runtime.partitions import consume
from services.runtime.heartbeat import send_heartbeats
from services.runtime.nats_auth import service_credentials
from services.runtime.service import replica_of
from services.runtime.settings import Settings

NAME = "projector"


async def run(settings: Settings) -> None:
    projector = Projector(open_task_board(settings), open_audit_log(settings))
    async with open_bus(settings.nats_url, name=NAME, credentials=service_credentials(settings, NAME),
                       stream_limits=StreamLimits.from_settings(settings)) as bus:
        replica = replica_of(settings)
        await run_all(
            send_heartbeats(bus.nc, NAME, faults=settings.faults),
            # The audit log follows every event in stream order, through one consumer.
            consume(bus, service=NAME, store=projector.audit, replica=replica, subscription=[
                Subscription(event_type, handle, projector.append_batch_to_audit_log)
                for event_type, handle in projector.audit_handlers().items()]),
            # The board takes each task's events in order, a partition at a time.
            consume(bus, service=NAME, store=projector.board, replica=replica, subscription=[
                Subscription(event_type, handle, projector.project_batch)
                for event_type, handle in projector.board_handlers().items()]),
        )
