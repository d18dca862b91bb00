"""Composition root of the projector process."""

from __future__ import annotations

from eventsourcing.persistence import Tracking

from events import Envelope
from projections.sql import open_database
from projections.task_board import PROJECTED_TYPES, TaskBoard
from services.projector.audit_sources import open_audit_log
from services.runtime.bus import open_bus
from services.runtime.consumer import ALL_EVENTS, Subscription, consume, run_all
from services.runtime.heartbeat import send_heartbeats
from services.runtime.settings import Settings

NAME = "projector"


def open_task_board(settings: Settings) -> TaskBoard:
    """The task board, in PostgreSQL when BATON_DATABASE_URL is set, else SQLite in the data dir."""
    db = open_database(
        database_url=settings.database_url,
        sqlite_path=settings.path("projections", "task_board.sqlite"),
        schema="baton_projections",
    )
    return TaskBoard(db)


async def run(settings: Settings) -> None:
    board = open_task_board(settings)
    audit = open_audit_log(settings)

    async def project(envelope: Envelope, tracking: Tracking) -> None:
        board.apply(envelope, tracking)

    async def append_to_audit_log(envelope: Envelope, tracking: Tracking) -> None:
        audit.append(envelope, tracking)

    async with open_bus(settings.nats_url, name=NAME) as bus:
        await run_all(
            send_heartbeats(bus.nc, NAME, faults=settings.faults),
            # The audit log follows every event in stream order, through one consumer.
            consume(bus, service=NAME, subscription=Subscription(ALL_EVENTS, append_to_audit_log),
                    store=audit),
            *(
                consume(bus, service=NAME, subscription=Subscription(event_type, project), store=board)
                for event_type in PROJECTED_TYPES
            ),
        )
