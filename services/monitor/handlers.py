"""The monitor's reactions: observe each handoff of each turn, and on every tick name the gaps that opened."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

from eventsourcing.persistence import Tracking

from events import FLOW_CONTRACT, Deadline, Envelope, TaskCancelled, TaskCancelRequested, TaskFailed, partition_of
from events.flow import NEW_TURN, PROVIDER_DEADLINES, TURN_NUMBERED, WAITING_FOR
from services.monitor.domain import Watch, skipped
from services.runtime.consumer import Handler, Subscription
from services.runtime.partitions import HeldPartitions
from services.runtime.handlers import declared_handlers, handles
from services.runtime.store import ServiceStore, forgotten_if_unsaved

log = logging.getLogger(__name__)

ACTIVITY_TYPES = ("ToolCallStarted", "ToolCallUpdated", "PlanUpdated", "UsageRecorded",
                  "PermissionRequested", "PermissionAnswered")
"""What an agent does besides printing: an agent in a long tool call is busy, not stalled."""
TASK_LEVEL_TYPES = (TaskFailed.type, TaskCancelled.type, TaskCancelRequested.type, "TaskCompleted", NEW_TURN)
"""Events about the whole task, whichever attempt runs."""
WATCHED_TYPES = (*FLOW_CONTRACT, TaskFailed.type, *ACTIVITY_TYPES, *WAITING_FOR,
                 TaskCancelled.type, TaskCancelRequested.type, NEW_TURN,
                 *(d.expected for d in PROVIDER_DEADLINES))
REMEMBERED_TYPES = tuple(step for step in FLOW_CONTRACT if step != "AgentOutput")
"""Handoffs that happen once a turn: each occurrence is remembered, so a turn whose beginning is
folded after its first handoffs (each type has its own consumer) still counts them as its own."""


class Monitor:
    """Keeps one live Watch per running task (the only copy that is saved)."""

    def __init__(self, store: ServiceStore, deadlines: tuple[Deadline, ...], *, stall_after_s: float,
                 held: HeldPartitions | None = None) -> None:
        self.store = store
        self.held = held or HeldPartitions()
        self.held.listeners.append(self._partition_changed)
        self.deadlines = deadlines
        self.stall_after_s = stall_after_s
        self.watches: dict[str, Watch] = {}
        self.last_output_at: dict[str, datetime] = {}
        self.last_agent_output: dict[str, tuple[datetime, str]] = {}  # task → (at, id) of its latest AgentOutput

    def watch_for(self, task_id: str) -> Watch:
        if task_id not in self.watches:
            existing = self.store.get_task_aggregate(Watch, task_id)
            self.watches[task_id] = existing or Watch(task_id)
        return self.watches[task_id]

    def _partition_changed(self, partition: int, held: bool) -> None:
        """A partition taken over: its tasks' timers continue from the stored times. One given up:
        its tasks are another replica's now (and what is cached here goes stale)."""
        if held:
            self.resume()
            return
        for task_id in [t for t in self.watches if partition_of(t) == partition]:
            self.watches.pop(task_id, None)
            self.last_output_at.pop(task_id, None)
            self.last_agent_output.pop(task_id, None)

    def resume(self) -> None:
        """After a restart, every unfinished task's timers (of the partitions held) continue from
        the stored times."""
        topic = f"{Watch.__module__}:{Watch.__qualname__}.Opened"
        start = 0
        while batch := self.store.process_recorder.select_notifications(
            start, 500, topics=[topic], inclusive_of_start=False
        ):
            for notification in batch:
                watch = self.store.repository.get(notification.originator_id)
                if not watch.ended and self.held.holds_task(watch.task_id) and watch.task_id not in self.watches:
                    self.watches[watch.task_id] = watch
                    # When its agent last printed was not kept: its silence is counted from now,
                    # never from before (a resumed or taken-over task is not stalled by default).
                    self.last_output_at.setdefault(watch.task_id, datetime.now(UTC))
            start = batch[-1].id

    @handles(*WATCHED_TYPES)
    async def on_event(self, envelope: Envelope, tracking: Tracking) -> None:
        await self.on_batch([(envelope, tracking)])

    async def on_batch(self, items: list[tuple[Envelope, Tracking]]) -> None:
        """Fold a run of one consumer's events, then save what changed with the last position
        in one transaction (a chatty agent's output costs one commit per fetch, not per line)."""
        watches = {envelope.task_id: self._fold(envelope) for envelope, _ in items}
        for watch in watches.values():
            if watch.ended and watch.counted_seq != watch.last_seq:
                watch.output_counted(watch.last_seq)
        with forgotten_if_unsaved(self.watches, *watches):
            self.store.save_processed(items[-1][1], *watches.values())
        for task_id, watch in watches.items():
            if watch.ended:
                self.watches.pop(task_id, None)
                self.last_output_at.pop(task_id, None)
                self.last_agent_output.pop(task_id, None)

    def _fold(self, envelope: Envelope) -> Watch:
        watch = self.watch_for(envelope.task_id)
        attempt = envelope.data.get("attempt", 1) if envelope.type == "WorkspaceRequested" else 1
        if attempt > watch.attempt:
            watch.attempt_began(attempt, envelope.occurred_at.isoformat())
            self.last_output_at.pop(envelope.task_id, None)
        elif envelope.type not in TASK_LEVEL_TYPES and watch.of_earlier_attempt(envelope):
            return watch
        if envelope.type == "AgentOutput":
            self._remember_output(envelope)
        if not self._of_current_turn(watch, envelope):
            return watch
        if envelope.type in ACTIVITY_TYPES:
            self.last_output_at[envelope.task_id] = envelope.occurred_at
            _note_person(watch, envelope)
            return watch
        if envelope.type == "AgentOutput":
            self.last_output_at[envelope.task_id] = envelope.occurred_at
            watch.last_seq = max(watch.last_seq, envelope.data["seq"])
            if watch.stalled_at_seq is not None and "AgentOutput" in watch.overdue and "AgentOutput" in watch.seen:
                watch.recovered_step("AgentOutput", envelope.occurred_at, cause=envelope.event_id)
        if envelope.type not in watch.seen:
            self._observe(watch, envelope)
        elif envelope.type in REMEMBERED_TYPES:
            watch.remember(envelope.type, envelope.occurred_at, envelope.event_id)
        return watch

    def _remember_output(self, envelope: Envelope) -> None:
        """The task's latest AgentOutput (in memory: output is too chatty to record), for a turn
        whose beginning is folded after its output."""
        latest = self.last_agent_output.get(envelope.task_id)
        if latest is None or envelope.occurred_at > latest[0]:
            self.last_agent_output[envelope.task_id] = (envelope.occurred_at, envelope.event_id)

    def _observe(self, watch: Watch, envelope: Envelope) -> None:
        """The current turn's first `envelope.type`: a late one recovers, a skipped one is named."""
        watch.observe(envelope.type, envelope.occurred_at.isoformat(), envelope.event_id)
        if envelope.type in watch.overdue:
            watch.recovered_step(envelope.type, envelope.occurred_at, cause=envelope.event_id)
        self._name_skipped_steps(watch, at=envelope.occurred_at)

    def _of_current_turn(self, watch: Watch, envelope: Envelope) -> bool:
        """Whether `envelope` belongs to the turn being watched; one of a later turn (its number,
        or its TurnRequested) begins that turn first, and the turn began no later than any of its
        numbered events (the task runner records TurnRequested once the vm_agent took the turn, so
        the turn's PromptDelivered may be older). An earlier turn's event, folded late, is only
        remembered."""
        if envelope.type in TURN_NUMBERED:
            turn = envelope.data.get("turn", 1)
            if turn < watch.turn:
                return False
            if (turn > watch.turn or (envelope.type == NEW_TURN and not watch.turn_requested)
                    or watch.of_earlier_turn(envelope)):  # The turn began before its request was recorded.
                self._begin_turn(watch, envelope, turn)
            return True
        if envelope.type in TASK_LEVEL_TYPES or not watch.of_earlier_turn(envelope):
            return True
        if envelope.type in REMEMBERED_TYPES:
            watch.remember(envelope.type, envelope.occurred_at, envelope.event_id)
        return False

    def _begin_turn(self, watch: Watch, envelope: Envelope, turn: int) -> None:
        watch.turn_began(turn, bool(envelope.data.get("reprovision", False)), envelope.occurred_at.isoformat(),
                         envelope.event_id, requested=envelope.type == NEW_TURN)
        output_at, output_id = self.last_agent_output.get(envelope.task_id, (None, ""))
        if output_at is not None and "AgentOutput" not in watch.seen and not watch.before_turn(output_at):
            # The turn's output was folded before its beginning (each type has its own consumer).
            watch.observe("AgentOutput", output_at.isoformat(), output_id)
        if envelope.type in watch.seen:  # Else its own observation, next, names what was skipped.
            self._name_skipped_steps(watch, at=envelope.occurred_at)

    def _name_skipped_steps(self, watch: Watch, *, at: datetime) -> None:
        for deadline in watch.deadlines(self.deadlines):
            if (deadline.after in watch.seen and deadline.expected not in watch.seen
                    and deadline.expected not in watch.overdue and not _waits_for(watch, deadline.expected)
                    and skipped(deadline, watch)):
                watch.overdue_step(deadline, at)

    def tick(self, now: datetime) -> None:
        """Name every deadline that passed and every agent that went silent."""
        for watch in list(self.watches.values()):
            if not self.held.holds_task(watch.task_id):
                continue  # Another replica's (it may have been cached before the partition moved).
            changed = False
            for deadline in watch.deadlines(self.deadlines):
                started = watch.deadline_start(deadline.after)
                if (started and deadline.expected not in watch.seen and deadline.expected not in watch.overdue
                        and not _waits_for(watch, deadline.expected)
                        and (now - started).total_seconds() > deadline.seconds):
                    watch.overdue_step(deadline, now)
                    changed = True
            changed |= self._check_stall(watch, now)
            if changed:
                with forgotten_if_unsaved(self.watches, watch.task_id):
                    self.store.save(watch)

    def _check_stall(self, watch: Watch, now: datetime) -> bool:
        if "PromptDelivered" not in watch.seen or "AgentFinished" in watch.seen or watch.ended:
            return False
        if watch.waiting_for_person:
            return False
        if watch.stalled_at_seq == watch.last_seq and "AgentOutput" in watch.overdue:
            return False
        delivered_at = watch.seen_at("PromptDelivered")
        assert delivered_at is not None
        quiet_since = max(self.last_output_at.get(watch.task_id, delivered_at), delivered_at)
        silent_s = (now - quiet_since).total_seconds()
        if silent_s <= self.stall_after_s:
            return False
        watch.stalled(silent_s)
        return True

    async def run_ticks(self, interval_s: float = 0.5) -> None:
        while True:
            self.tick(datetime.now(UTC))
            await asyncio.sleep(interval_s)

    def waiting_for_person(self, task_id: str) -> bool:
        watch = self.watches.get(task_id)
        return watch is not None and watch.waiting_for_person

    def handlers(self) -> dict[str, Handler]:
        """Event type -> handler, as declared (`@handles`); a run of them goes to `on_batch`."""
        return declared_handlers(self)

    def subscriptions(self) -> list[Subscription]:
        return [Subscription(event_type, handle, self.on_batch) for event_type, handle in self.handlers().items()]


def _waits_for(watch: Watch, expected: str) -> bool:
    """The task legitimately waits for `expected` (e.g. queued for a place), or a person asked to
    cancel it (the task runner ends it in seconds, whatever was left undone): no deadline runs."""
    return TaskCancelRequested.type in watch.seen or any(waiting in watch.seen for waiting, awaited in WAITING_FOR.items() if awaited == expected)


def _note_person(watch: Watch, envelope: Envelope) -> None:
    """A permission request a person must answer opens a wait; its answer closes it (under the
    `auto` policy the two come together and the wait is nil)."""
    request_id = envelope.data.get("request_id")
    if envelope.type == "PermissionRequested":
        watch.person_asked(request_id, envelope.occurred_at.isoformat())
    elif envelope.type == "PermissionAnswered":
        watch.person_answered(request_id, envelope.occurred_at.isoformat())
