"""Composition root of the projector process."""

from __future__ import annotations

from eventsourcing.persistence import Tracking

from events import Envelope
from projections.task_board import STATE_OF, TaskBoard
from services.runtime.bus import open_bus
from services.runtime.consumer import Subscription, consume, run_all
from services.runtime.heartbeat import send_heartbeats
from services.runtime.settings import Settings

NAME = "projector"


def board_path(settings: Settings):
    return settings.path("projections", "task_board.sqlite")


async def run(settings: Settings) -> None:
    board = TaskBoard(board_path(settings))

    async def project(envelope: Envelope, tracking: Tracking) -> None:
        board.apply(envelope, tracking)

    async with open_bus(settings.nats_url, name=NAME) as bus:
        await run_all(
            send_heartbeats(bus.nc, NAME, faults=settings.faults),
            *(
                consume(bus, service=NAME, subscription=Subscription(event_type, project), store=board)
                for event_type in STATE_OF
            ),
        )
