"""What the task runner does on each event (each handler says which: `@handles`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from eventsourcing.application import AggregateNotFoundError
from eventsourcing.persistence import Tracking

from events import (
    AgentFinished,
    AgentSessionStarted,
    BranchPushed,
    Envelope,
    FollowUpSubmitted,
    PermissionAnswerGiven,
    PromptDelivered,
    SessionFailed,
    StepOverdue,
    TaskCancelRequested,
    TaskSubmitted,
    WorkspaceFailed,
    WorkspaceReady,
    WorkspaceReleased,
    parse_event,
)
from events.flow import NEW_TURN, TURN_CONTRACT, TURN_NUMBERED, contract_for_turn
from services.runtime.consumer import Handler
from services.runtime.partitions import HeldPartitions
from services.runtime.handlers import declared_handlers, handles
from services.runtime.store import ServiceStore
from services.task_runner.domain import Task
from services.task_runner.late_steps import LateStepChecks
from services.task_runner.queue import QUEUE_ID, RunQueue
from services.task_runner.vm_agent_client import AgentStarter, AgentStartRefused, VmAgentSilent

log = logging.getLogger(__name__)


class EventLookup(Protocol):
    async def last_event(self, task_id: str, event_type: str) -> Envelope | None: ...


class TaskRunnerHandlers:
    def __init__(
        self,
        store: ServiceStore,
        starter: AgentStarter,
        lookup: EventLookup,
        *,
        overdue_backoff_s: Sequence[float] = (1.0, 2.0, 4.0),
        max_running: int = 8,
        max_attempts: int = 3,
        held: HeldPartitions | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.starter = starter
        self.lookup = lookup
        self.overdue_backoff_s = tuple(overdue_backoff_s)
        self.max_running = max_running
        self.max_attempts = max_attempts
        self.clock = clock
        self._queue: RunQueue | None = None
        self.late_steps = LateStepChecks(store, self, held=held, clock=clock)
        """The loop that works the checks `on_step_overdue` records (serve it with the handlers)."""

    def queue(self) -> RunQueue:
        """The fair queue, replayed from the store once and kept. Replicas share it: a copy gone stale
        (another replica decided since) fails its save on its version, is dropped and read again."""
        if self._queue is None:
            try:
                self._queue = self.store.repository.get(QUEUE_ID)
            except AggregateNotFoundError:
                self._queue = RunQueue()
        return self._queue

    def _save(self, tracking: Tracking | None, task: Task, *, cause: str) -> None:
        """Save the task with the consumer position (none: a late step's check); a task that just
        ended frees its place, and the next waiting task gets it (its WorkspaceRequested) in the
        same transaction."""
        queue, placed = self.queue(), []
        try:
            if task.is_over and queue.holds(task.task_id):
                queue.release(task.task_id)
                placed = self._fill_places(queue, cause=cause)
            if tracking is None:
                self.store.save(task, queue, *placed)
            else:
                self.store.save_processed(tracking, task, queue, *placed)
        except BaseException:
            self._queue = None  # Not committed: the store, not this copy, says what was decided.
            raise
        self.late_steps.note(task)

    def save_checked(self, task: Task, *, cause: str) -> None:
        """Save what a check of a late step decided (LateStepChecks), with no consumer position."""
        self._save(None, task, cause=cause)

    def _fill_places(self, queue: RunQueue, *, cause: str) -> list[Task]:
        placed = []
        while (task_id := queue.next_waiting(self.max_running)) is not None:
            waiting = self.store.get_task_aggregate(Task, task_id)
            if waiting is None or waiting.is_over:
                queue.release(task_id)  # Ended while it waited: nothing to start.
                continue
            queue.place(task_id)
            waiting.request_workspace(cause=cause)
            placed.append(waiting)
        return placed

    def _task(self, envelope: Envelope) -> Task | None:
        task = self.store.get_task_aggregate(Task, envelope.task_id)
        if task is None:
            log.warning("%s for unknown task %s", envelope.type, envelope.task_id)
        return task

    @handles(TaskSubmitted)
    async def on_task_submitted(self, envelope: Envelope, tracking: Tracking) -> None:
        if self.store.get_task_aggregate(Task, envelope.task_id) is not None:
            return
        submitted = parse_event(envelope)
        assert isinstance(submitted, TaskSubmitted)
        task = Task(
            envelope.task_id, submitted.repo, submitted.prompt, submitted.agent, submitted.base_branch,
            submitted.permission_policy, submitted.provider,
        )
        queue = self.queue()
        if queue.has_place(self.max_running) and not queue.waiting:
            queue.place(task.task_id)
            task.request_workspace(cause=envelope.event_id)
        else:
            queue.wait(task.task_id)
            position = queue.position_of(task.task_id)
            assert position is not None
            task.wait_for_place(position=position, max_running=self.max_running, cause=envelope.event_id)
        self._save(tracking, task, cause=envelope.event_id)

    @handles(WorkspaceReady)
    async def on_workspace_ready(self, envelope: Envelope, tracking: Tracking) -> None:
        task = self._task(envelope)
        if task is None or task.is_over or task.state == "starting":
            return
        ready = parse_event(envelope)
        assert isinstance(ready, WorkspaceReady)
        attempt_id = f"{task.task_id}-a{task.attempt + 1}"
        if task.cancel_requested:  # Cancelled while provisioning: start nothing, let the vm_agent go.
            await self._cancel_session(task, ready.vm_agent_url, attempt_id, ready.credential_expires_at)
            task.cancel(cause=envelope.event_id)
            self._save(tracking, task, cause=envelope.event_id)
            return
        try:
            await self._start_agent(task, ready.vm_agent_url, attempt_id=attempt_id, cause=envelope.event_id,
                                    token_expires_at=ready.credential_expires_at)
        except VmAgentSilent as error:
            # It may have started the agent: taken as started, and the PromptDelivered deadline
            # decides (on_step_overdue asks again with the same attempt id, which starts nothing twice).
            log.warning("vm_agent of %s did not answer the start (%s); the prompt's deadline decides",
                        task.task_id, error)
            task.agent_start_requested(ready.vm_agent_url, ready.credential_expires_at)
        except AgentStartRefused as error:
            # A redelivered WorkspaceReady may find the vm_agent done and gone: the stream
            # says whether this attempt already started.
            if not await self._attempt_started(task.task_id, attempt_id):
                task.fail(f"could not start the agent: {error}", cause=envelope.event_id)
            else:
                task.agent_start_requested(ready.vm_agent_url, ready.credential_expires_at)
        else:
            task.agent_start_requested(ready.vm_agent_url, ready.credential_expires_at)
        self._save(tracking, task, cause=envelope.event_id)

    async def _start_agent(self, task: Task, vm_agent_url: str, *, attempt_id: str, cause: str,
                           token_expires_at: float | None) -> None:
        """The vm_agent's `sessions` command: the running turn's prompt as that turn, and (after an
        earlier attempt or turn) the task's last ACP session to restore; raises AgentStartRefused."""
        resume_session_id = None
        if task.attempt >= 1:  # An earlier attempt opened an agent session: restore it where possible.
            started = await self.lookup.last_event(task.task_id, AgentSessionStarted.type)
            resume_session_id = started.data.get("session_id") if started is not None else None
        await self.starter.start_agent_with_prompt(
            vm_agent_url, task_id=task.task_id, agent=task.agent, prompt=task.turn_prompt,
            attempt_id=attempt_id, causation_id=cause, token_expires_at=token_expires_at,
            permission_policy=task.permission_policy, turn=task.turn, resume_session_id=resume_session_id,
        )

    async def _attempt_started(self, task_id: str, attempt_id: str) -> bool:
        started = await self.lookup.last_event(task_id, AgentSessionStarted.type)
        return started is not None and started.data.get("attempt_id") == attempt_id

    @handles(WorkspaceFailed)
    async def on_workspace_failed(self, envelope: Envelope, tracking: Tracking) -> None:
        failed = parse_event(envelope)
        assert isinstance(failed, WorkspaceFailed)
        await self._fail(envelope, tracking, f"workspace failed: {failed.reason}")

    @handles(SessionFailed)
    async def on_session_failed(self, envelope: Envelope, tracking: Tracking) -> None:
        failed = parse_event(envelope)
        assert isinstance(failed, SessionFailed)
        if not failed.lost_workspace:
            await self._fail(envelope, tracking, failed.reason)
            return
        task = self._task(envelope)
        if task is None or task.is_over or not task.running_attempt:
            return  # Not the running attempt's loss (already handled, or the task ended).
        await self._after_lost_workspace(task, failed.reason, cause=envelope.event_id)
        self._save(tracking, task, cause=envelope.event_id)

    async def _after_lost_workspace(self, task: Task, reason: str, *, cause: str) -> None:
        """A new attempt from the last pushed commit while attempts remain; else the task fails
        naming the loss. A task a person asked to cancel ends cancelled."""
        if task.cancel_requested:
            task.cancel(cause=cause)
        elif not task.may_try_again(self.max_attempts):
            task.fail(task.attempts_ran_out(reason), cause=cause)
        else:
            task.start_new_attempt(reason, base_branch=await self._branch_to_start_from(task), cause=cause)

    async def _branch_to_start_from(self, task: Task) -> str | None:
        """The task's branch if a turn pushed it, else the task's base branch."""
        pushed = await self.lookup.last_event(task.task_id, BranchPushed.type)
        return (pushed.data.get("branch") if pushed is not None else None) or task.base_branch

    @handles(AgentFinished)
    async def on_agent_finished(self, envelope: Envelope, tracking: Tracking) -> None:
        finished = parse_event(envelope)
        assert isinstance(finished, AgentFinished)
        if finished.stop_reason == "end_turn":
            return  # The vm_agent pushes next; BranchPushed completes the task.
        exit_note = f", exit code {finished.exit_code}" if finished.exit_code is not None else ""
        await self._fail(envelope, tracking, f"agent stopped: {finished.stop_reason}{exit_note}")

    @handles(BranchPushed)
    async def on_branch_pushed(self, envelope: Envelope, tracking: Tracking) -> None:
        task = self._task(envelope)
        if task is None:
            return
        pushed = parse_event(envelope)
        assert isinstance(pushed, BranchPushed)
        # The path is the product: a turn completes only if every handoff of its own before the push happened.
        missing = await self._missing_handoffs(task, before=BranchPushed.type)
        if missing:
            in_turn = f" in turn {task.turn}" if task.turn > 1 else ""
            task.fail(f"{missing[0]} missing{in_turn}: the flow reached BranchPushed without it",
                      cause=envelope.event_id)
        else:
            task.complete(branch=pushed.branch, commit=pushed.commit, cause=envelope.event_id)
            await self._start_next_turn(task, cause=envelope.event_id)  # One sent during the turn runs now.
        self._save(tracking, task, cause=envelope.event_id)

    @handles(FollowUpSubmitted)
    async def on_follow_up_submitted(self, envelope: Envelope, tracking: Tracking) -> None:
        """Keep a person's follow-up in order; it runs at once if the agent is idle (the task
        completed, its workspace lingering), else once the running turn's push is recorded."""
        task = self.store.get_task_aggregate(Task, envelope.task_id)
        if task is None:  # Its TaskSubmitted (another consumer) is not handled yet: retried.
            raise LookupError(f"follow-up for {envelope.task_id} before its TaskSubmitted was handled")
        submitted = parse_event(envelope)
        assert isinstance(submitted, FollowUpSubmitted)
        if not task.takes_follow_ups:
            log.info("follow-up to %s (%s) not run: the task takes no more turns", task.task_id, task.state)
            return
        task.queue_follow_up(submitted.prompt, envelope.event_id)
        await self._start_next_turn(task, cause=envelope.event_id)
        self._save(tracking, task, cause=envelope.event_id)

    @handles(WorkspaceReleased)
    async def on_workspace_released(self, envelope: Envelope, tracking: Tracking) -> None:
        """The task's vm_agent is gone: its next follow-up re-provisions a workspace."""
        task = self._task(envelope)
        released = parse_event(envelope)
        assert isinstance(released, WorkspaceReleased)
        if task is None or not task.workspace_lingers or released.attempt != task.attempt:
            return
        task.workspace_released(released.attempt)
        await self._start_next_turn(task, cause=envelope.event_id)
        self._save(tracking, task, cause=envelope.event_id)

    async def _start_next_turn(self, task: Task, *, cause: str) -> None:
        """Start the oldest waiting follow-up's turn once the agent is idle (the task completed): on
        the lingering vm_agent, or, once its workspace was released (or its vm_agent refuses: it is
        gone), on a workspace re-provisioned from the task's branch."""
        if not task.next_follow_up_due:
            return
        if task.workspace_lingers and await self._handed_to_lingering_vm_agent(task):
            task.start_turn_on_lingering_session(cause=cause)
            return
        task.reprovision_for_next_turn(base_branch=await self._branch_to_start_from(task), cause=cause)

    async def _handed_to_lingering_vm_agent(self, task: Task) -> bool:
        """True once the lingering vm_agent took the oldest follow-up as the next turn; False when it
        refused or is gone. Raises VmAgentSilent when it did not answer (it may have taken the turn):
        the event is handled again later and asks again for the same turn, which starts nothing twice."""
        assert task.vm_agent_url is not None
        follow_up_id, prompt = task.follow_ups[0]
        turn = task.turn + 1
        try:
            await self.starter.start_turn(
                task.vm_agent_url, task_id=task.task_id, attempt_id=task.attempt_id, turn=turn,
                prompt=prompt, causation_id=follow_up_id, token_expires_at=task.vm_agent_token_expires_at)
        except VmAgentSilent:
            raise  # Re-provisioning now could run the turn twice.
        except AgentStartRefused as error:
            log.info("turn %s of %s re-provisions: the lingering vm_agent did not take it: %s",
                     turn, task.task_id, error)
            return False
        return True

    async def _missing_handoffs(self, task: Task, *, before: str) -> list[str]:
        """The running turn's own handoffs before `before` that did not happen in that turn, in
        contract order (an earlier turn's do not count). The turn's TurnRequested is this runner's own
        record (task.turn says it was made): the stream is not asked, as the vm_agent may push a
        lingering session's quick turn before the relay has published it."""
        contract = contract_for_turn(task.turn, reprovisioned=not task.turn_runs_on_lingering_session)
        steps = [step for step in contract[: contract.index(before)] if step != NEW_TURN]
        came = await asyncio.gather(*(self.came_in_turn(task.task_id, step, task.turn) for step in steps))
        return [step for step, happened in zip(steps, came, strict=True) if not happened]

    @handles(StepOverdue)
    async def on_step_overdue(self, envelope: Envelope, tracking: Tracking) -> None:
        """Retry what can be retried, then record the late handoff as awaited, checked for after each
        of `overdue_backoff_s` by `late_steps` (never here: a handler that waits holds up its partition)."""
        task = self._task(envelope)
        overdue = parse_event(envelope)
        assert isinstance(overdue, StepOverdue)
        if (task is None or task.is_over or overdue.expected == overdue.after or overdue.turn < task.turn
                or task.awaits_late_step(overdue.expected, overdue.turn)):
            return  # Nothing to wait for, or its checks already run (it was named again).
        if overdue.expected == PromptDelivered.type and task.vm_agent_url and self.overdue_backoff_s:
            await self.retry_start(task, cause=envelope.event_id)
        now, due_at = self.clock(), []
        for delay_s in self.overdue_backoff_s:
            due_at.append((due_at[-1] if due_at else now) + delay_s)
        # No backoff at all: checked once, at once (the loop's next tick), then failed.
        task.await_late_step(overdue.expected, overdue.after, overdue.turn, overdue.waited_s, envelope.event_id,
                             awaited_at=now, due_at=due_at or [now])
        self._save(tracking, task, cause=envelope.event_id)

    async def came_in_turn(self, task_id: str, step: str, turn: int) -> bool:
        """`step` happened in turn `turn`: its `turn` says so, or it followed that turn's PromptDelivered
        (the agent's steps) or TurnRequested (a re-provisioned workspace's)."""
        found = await self.lookup.last_event(task_id, step)
        if found is None or turn == 1:
            return found is not None
        if step in TURN_NUMBERED:
            return found.data.get("turn", 1) >= turn
        # The agent's steps follow the turn's PromptDelivered (the vm_agent's clock); a re-provisioned
        # workspace's follow its TurnRequested.
        began = await self.lookup.last_event(task_id, PromptDelivered.type if step in TURN_CONTRACT else NEW_TURN)
        return (began is not None and began.data.get("turn", 1) >= turn
                and found.occurred_at >= began.occurred_at)

    async def retry_start(self, task: Task, *, cause: str) -> None:
        # Same attempt id and turn: the vm_agent starts nothing twice and never re-sends a delivered prompt.
        assert task.vm_agent_url is not None
        try:
            if task.turn_runs_on_lingering_session:
                await self.starter.start_turn(
                    task.vm_agent_url, task_id=task.task_id, attempt_id=task.attempt_id, turn=task.turn,
                    prompt=task.turn_prompt, causation_id=cause, token_expires_at=task.vm_agent_token_expires_at)
            else:
                await self._start_agent(task, task.vm_agent_url, attempt_id=task.attempt_id, cause=cause,
                                        token_expires_at=task.vm_agent_token_expires_at)
        except AgentStartRefused as error:
            log.warning("retrying the start of %s: %s", task.task_id, error)

    @handles(PermissionAnswerGiven)
    async def on_permission_answer_given(self, envelope: Envelope, tracking: Tracking) -> None:
        """Hand a person's answer to the task's vm_agent (which records PermissionAnswered)."""
        task = self._task(envelope)
        given = parse_event(envelope)
        assert isinstance(given, PermissionAnswerGiven)
        if task is None or task.is_over or task.vm_agent_url is None:
            return
        try:
            await self.starter.answer_permission(
                task.vm_agent_url, task_id=task.task_id, request_id=given.request_id,
                option_id=given.option_id, token_expires_at=task.vm_agent_token_expires_at)
        except AgentStartRefused as error:  # Timed out meanwhile, or the run is over: on the record.
            log.warning("answer to permission %s of %s not taken: %s", given.request_id, task.task_id, error)

    @handles(TaskCancelRequested)
    async def on_task_cancel_requested(self, envelope: Envelope, tracking: Tracking) -> None:
        """A queued task ends `cancelled` at once; a running agent is stopped by its vm_agent (its
        AgentFinished `cancelled` then ends the task); one still provisioning ends on WorkspaceReady."""
        task = self._task(envelope)
        asked = parse_event(envelope)
        assert isinstance(asked, TaskCancelRequested)
        if task is None or task.is_over or task.cancel_requested:
            return
        task.request_cancel(asked.by, asked.reason)
        if task.state == "queued":
            task.cancel(cause=envelope.event_id)
        elif task.state == "starting" and task.vm_agent_url:
            stopping = await self._cancel_session(task, task.vm_agent_url, task.attempt_id,
                                                  task.vm_agent_token_expires_at)
            if stopping is None:  # No vm_agent to stop it: nothing of the task runs.
                task.cancel(cause=envelope.event_id)
        self._save(tracking, task, cause=envelope.event_id)

    async def _cancel_session(self, task: Task, vm_agent_url: str, attempt_id: str,
                              token_expires_at: float | None) -> bool | None:
        """Ask the vm_agent to stop the agent (True), or learn the turn already ended (False);
        None when the vm_agent cannot be reached."""
        try:
            return await self.starter.cancel_session(
                vm_agent_url, task_id=task.task_id, attempt_id=attempt_id, agent=task.agent,
                token_expires_at=token_expires_at)
        except AgentStartRefused as error:
            log.warning("cancel of %s: %s", task.task_id, error)
            return None

    async def _fail(self, envelope: Envelope, tracking: Tracking, reason: str) -> None:
        task = self._task(envelope)
        if task is None:
            return
        task.fail(reason, cause=envelope.event_id)
        self._save(tracking, task, cause=envelope.event_id)

    def handlers(self) -> dict[str, Handler]:
        """Event type -> handler, as declared next to each (`@handles`)."""
        return declared_handlers(self)
