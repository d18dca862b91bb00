"""The projector's reactions: the task board folds the events it shows, the audit log keeps every event.

The two read models have stores of their own, so each has its own consumers: the board's handler
is declared for PROJECTED_TYPES, the audit log's for every event (its key is EVERY_EVENT).
"""

from __future__ import annotations

from eventsourcing.persistence import Tracking

from events import Envelope
from projections.audit_log import AuditLog
from projections.task_board import PROJECTED_TYPES, TaskBoard
from services.runtime.consumer import Handler
from services.runtime.handlers import EVERY_EVENT, declared_handlers, handles, handles_every_event


class Projector:
    def __init__(self, board: TaskBoard, audit: AuditLog) -> None:
        self.board = board
        self.audit = audit

    @handles(*PROJECTED_TYPES)
    async def project(self, envelope: Envelope, tracking: Tracking) -> None:
        self.board.apply(envelope, tracking)

    async def project_batch(self, items: list[tuple[Envelope, Tracking]]) -> None:
        """A run of the board's events in stream order, in one transaction."""
        self.board.apply_batch(items)

    @handles_every_event
    async def append_to_audit_log(self, envelope: Envelope, tracking: Tracking) -> None:
        self.audit.append(envelope, tracking)

    async def append_batch_to_audit_log(self, items: list[tuple[Envelope, Tracking]]) -> None:
        """A run of events (of every type) in stream order, in one transaction."""
        self.audit.append_batch(items)

    def board_handlers(self) -> dict[str, Handler]:
        """Event type -> the board's handler (its store: `self.board`; a run goes to `project_batch`)."""
        return {event_type: handle for event_type, handle in declared_handlers(self).items()
                if event_type != EVERY_EVENT}

    def audit_handlers(self) -> dict[str, Handler]:
        """{EVERY_EVENT: the audit log's handler} (its store: `self.audit`; a run goes to
        `append_batch_to_audit_log`)."""
        return {EVERY_EVENT: declared_handlers(self)[EVERY_EVENT]}
