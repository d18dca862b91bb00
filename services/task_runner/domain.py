"""The Task aggregate: what the task runner knows of a task and the only place a task ends."""

from __future__ import annotations

from dataclasses import dataclass, replace

from eventsourcing.domain import event

from events import (
    AttemptStarted,
    Envelope,
    TaskCancelled,
    TaskCompleted,
    TaskFailed,
    TaskQueued,
    TurnRequested,
    WorkspaceRequested,
)
from services.runtime.store import TaskAggregate

ACTOR = "service:task-runner"


@dataclass(frozen=True)
class LateStep:
    """A handoff the monitor named overdue (its StepOverdue: `cause`) that the task runner still
    waits for: checked at each of `due_at` (epoch seconds), its start retried between checks where
    it can be; still missing at the last, the task fails naming it."""

    expected: str
    after: str
    turn: int
    waited_s: float
    """How long the monitor had waited for it when it named it overdue."""
    cause: str
    awaited_at: float
    due_at: tuple[float, ...]

    @property
    def next_due(self) -> float:
        return self.due_at[0]

    @property
    def at_last_check(self) -> bool:
        return len(self.due_at) == 1

    def missing_reason(self) -> str:
        """Why the task fails when it never came (the same words since the handler slept for it)."""
        waited_s = self.waited_s + (self.due_at[-1] - self.awaited_at)
        in_turn = f" in turn {self.turn}" if self.turn > 1 else ""
        return f"{self.expected} missing {waited_s:.0f}s after {self.after}{in_turn}"


class Task(TaskAggregate):
    """queued → provisioning → starting → completed | failed | cancelled."""

    @event("Accepted")
    def __init__(
        self, task_id: str, repo: str, prompt: str, agent: str, base_branch: str | None,
        permission_policy: str = "auto", provider: str = "local",
    ) -> None:
        super().__init__(task_id)
        self.permission_policy = permission_policy
        self.provider = provider
        """Where its workspaces are made (TaskSubmitted.provider): every WorkspaceRequested says it."""
        self.repo = repo
        self.prompt = prompt
        self.agent = agent
        self.base_branch = base_branch
        self.state = "queued"
        self.attempt = 0
        self.vm_agent_url: str | None = None
        self.vm_agent_token_expires_at: float | None = None
        self.cancel_by: str | None = None
        self.cancel_reason: str | None = None
        self.turn = 1
        """The turn last started: 1 is the task's prompt, 2, 3, … its follow-ups."""
        self.turn_prompt = prompt
        """The prompt of turn `turn` (delivered again by a new attempt or a re-provisioned workspace)."""
        self.follow_ups: list[tuple[str, str]] = []
        """(FollowUpSubmitted id, prompt) not yet handed to the vm_agent, in the order people sent them."""
        self.follow_up_ids: set[str] = set()
        self.lost: list[str] = []  # why each earlier attempt was lost
        self.late_steps: dict[str, LateStep] = {}
        """Overdue handoffs still awaited, by type (LateStepAwaited); an ended task or a new workspace awaits none."""

    @property
    def is_over(self) -> bool:
        return self.state in ("completed", "failed", "cancelled")

    @property
    def cancel_requested(self) -> bool:
        return self.cancel_by is not None

    @event("CancelRequested")
    def request_cancel(self, by: str, reason: str | None = None) -> None:
        """Recorded once a person's TaskCancelRequested reached the task runner (the first one counts)."""
        if self.cancel_by is None:
            self.cancel_by, self.cancel_reason = by, reason

    def cancel(self, *, cause: str | None, pushed: tuple[str, str] | None = None) -> None:
        """End the task `cancelled`; `pushed`: the (branch, commit) pushed before the cancel, if any."""
        if not self.is_over:
            branch, commit = pushed or (None, None)
            event = TaskCancelled(by=self.cancel_by or "user", reason=self.cancel_reason,
                                  pushed=pushed is not None, branch=branch, commit=commit)
            self.emit(event, actor=ACTOR, causation_id=cause)

    @property
    def attempt_id(self) -> str:
        return f"{self.task_id}-a{self.attempt}"

    def wait_for_place(self, *, position: int, max_running: int, cause: str) -> None:
        """No place is free: the task waits `queued` (RunQueue gives it one later)."""
        self.emit(TaskQueued(position=position, max_running=max_running), actor=ACTOR, causation_id=cause)

    def request_workspace(self, *, cause: str) -> None:
        event = WorkspaceRequested(repo=self.repo, agent=self.agent, base_branch=self.base_branch,
                                   provider=self.provider)
        self.emit(event, actor=ACTOR, causation_id=cause)

    @property
    def running_attempt(self) -> bool:
        """The current attempt's agent was started (a lost workspace now calls for a new attempt)."""
        return self.state == "starting"

    def start_new_attempt(self, reason: str, *, base_branch: str | None, cause: str) -> None:
        """The workspace was lost: attempt n+1 gets a new one from `base_branch` (the task keeps
        its place in the queue) and its own attempt id, `<task>-a<n+1>`."""
        attempt = self.attempt + 1
        self.emit(AttemptStarted(attempt=attempt, reason=reason, base_branch=base_branch),
                  actor=ACTOR, causation_id=cause)
        event = WorkspaceRequested(repo=self.repo, agent=self.agent, base_branch=base_branch, attempt=attempt,
                                   provider=self.provider)
        self.emit(event, actor=ACTOR, causation_id=cause)

    def may_try_again(self, max_attempts: int) -> bool:
        """Whether a new attempt may follow the running one's lost workspace: BATON_MAX_ATTEMPTS
        counts the attempts lost workspaces started, not a workspace re-provisioned for a follow-up."""
        return len(self.lost) + 1 < max_attempts

    def attempts_ran_out(self, reason: str) -> str:
        """Why the task fails when its last attempt's workspace was lost too, for people."""
        losses = len(self.lost) + 1
        times = "once" if losses == 1 else f"{losses} times"
        return f"the workspace was lost {times} (no attempts left): {reason}"

    @event("AgentStartRequested")
    def agent_start_requested(self, vm_agent_url: str, token_expires_at: float | None = None) -> None:
        """Recorded once the workspace's vm_agent accepted `POST /sessions` for a new attempt."""
        self.attempt += 1
        self.vm_agent_url = vm_agent_url
        self.vm_agent_token_expires_at = token_expires_at
        self.state = "starting"

    def complete(self, *, branch: str, commit: str, cause: str) -> None:
        if not self.is_over:
            self.emit(TaskCompleted(branch=branch, commit=commit, turn=self.turn), actor=ACTOR, causation_id=cause)

    @property
    def takes_follow_ups(self) -> bool:
        """Neither failed nor cancelled (nor asked to be): a follow-up waits for its turn."""
        return self.state not in ("failed", "cancelled") and not self.cancel_requested

    @property
    def next_follow_up_due(self) -> bool:
        """A follow-up waits and the agent is idle: the last turn completed (its workspace lingers,
        or it was released and the turn re-provisions one)."""
        return bool(self.follow_ups) and self.state == "completed"

    @property
    def turn_runs_on_lingering_session(self) -> bool:
        """The running turn (2, 3, …) was handed to the lingering vm_agent as a turn of its session
        (so a retry resends that turn), not started on a new workspace's session."""
        return self.turn > 1 and getattr(self, "turn_on_lingering_session", False)

    @property
    def workspace_lingers(self) -> bool:
        """The last attempt's vm_agent may still take a turn (no WorkspaceReleased seen for it)."""
        return self.vm_agent_url is not None

    @event("WorkspaceReleasedSeen")
    def workspace_released(self, attempt: int) -> None:
        """The provisioner released attempt `attempt`'s workspace: its vm_agent takes no more turns."""
        if attempt == self.attempt:
            self.vm_agent_url = None

    def start_turn_on_lingering_session(self, *, cause: str) -> None:
        """The lingering vm_agent took the oldest follow-up as the next turn: the task runs again."""
        follow_up_id, _ = self.follow_ups[0]
        event = TurnRequested(turn=self.turn + 1, follow_up_id=follow_up_id, attempt=max(self.attempt, 1))
        self.emit(event, actor=ACTOR, causation_id=cause)

    def reprovision_for_next_turn(self, *, base_branch: str | None, cause: str) -> None:
        """The workspace was released: the oldest follow-up's turn gets a new workspace (attempt
        n+1, from `base_branch`, the task's pushed branch), where the agent's session is restored."""
        follow_up_id, _ = self.follow_ups[0]
        attempt = self.attempt + 1
        event = TurnRequested(turn=self.turn + 1, follow_up_id=follow_up_id, reprovision=True, attempt=attempt)
        self.emit(event, actor=ACTOR, causation_id=cause)
        requested = WorkspaceRequested(repo=self.repo, agent=self.agent, base_branch=base_branch, attempt=attempt,
                                       provider=self.provider)
        self.emit(requested, actor=ACTOR, causation_id=cause)

    @event("FollowUpQueued")
    def queue_follow_up(self, prompt: str, follow_up_id: str) -> None:
        """A person's follow-up (its FollowUpSubmitted's id), kept until its turn starts."""
        if follow_up_id not in self.follow_up_ids:
            self.follow_up_ids.add(follow_up_id)
            self.follow_ups.append((follow_up_id, prompt))

    @event("TurnStartRequested")
    def turn_start_requested(self, turn: int) -> None:
        """The vm_agent took the next follow-up as turn `turn` (recorded before TurnRequested
        existed; kept so older tasks replay)."""
        self.follow_ups.pop(0)
        self.turn = turn
        self.state = "starting"

    def _take_turn(self, follow_up_id: str, turn: int) -> None:
        prompts = dict(self.follow_ups)
        self.turn_prompt = prompts.get(follow_up_id, self.turn_prompt)
        self.follow_ups = [waiting for waiting in self.follow_ups if waiting[0] != follow_up_id]
        self.turn = turn
        self.state = "starting"  # A re-provision's WorkspaceRequested (next) makes it `provisioning`.

    @event("FollowUpsDropped")
    def drop_follow_ups(self, reason: str) -> None:
        """The session can take no more turns (its workspace is gone): the waiting ones are dropped."""
        self.follow_ups.clear()

    @event("LateStepAwaited")
    def await_late_step(self, expected: str, after: str, turn: int, waited_s: float, cause: str,
                        awaited_at: float, due_at: list[float]) -> None:
        """`expected` was named overdue (StepOverdue `cause`): it is checked for at each of `due_at`."""
        late = LateStep(expected, after, turn, waited_s, cause, awaited_at, tuple(due_at))
        self.late_steps = {**self.late_steps, expected: late}

    @event("LateStepChecked")
    def late_step_checked(self, expected: str) -> None:
        """Checked at its next due time and still missing (its start retried where it can be)."""
        if (late := self.late_steps.get(expected)) is not None:
            self.late_steps = {**self.late_steps, expected: replace(late, due_at=late.due_at[1:])}

    @event("LateStepArrived")
    def late_step_arrived(self, expected: str) -> None:
        """The awaited handoff came after all (the monitor names that StepRecovered)."""
        self.late_steps = {step: late for step, late in self.late_steps.items() if step != expected}

    def awaits_late_step(self, expected: str, turn: int) -> bool:
        late = self.late_steps.get(expected)
        return late is not None and late.turn == turn

    @property
    def next_late_check(self) -> float | None:
        """When the earliest awaited handoff is next checked for (epoch seconds), if any is awaited."""
        return min((late.next_due for late in self.late_steps.values()), default=None)

    def fail(self, reason: str, *, cause: str | None) -> None:
        """End the task `failed`; once a person asked to cancel it, whatever stopped it (the
        agent's cancelled turn included) ends it `cancelled`."""
        if self.cancel_requested:
            self.cancel(cause=cause)
        elif not self.is_over:
            self.emit(TaskFailed(reason=reason), actor=ACTOR, causation_id=cause)

    def apply(self, envelope: Envelope) -> None:
        if envelope.type in (WorkspaceRequested.type, TaskCompleted.type, TaskFailed.type, TaskCancelled.type):
            # Ended, or the flow starts again on a new workspace (the monitor's deadlines with it).
            self.late_steps = {}
        if envelope.type == WorkspaceRequested.type:
            self.state = "provisioning"
            self.vm_agent_url = None
            self.turn_on_lingering_session = False  # The turn now starts on the new workspace's session.
        elif envelope.type == AttemptStarted.type:
            self.lost.append(envelope.data["reason"])
        elif envelope.type == TurnRequested.type:
            self._take_turn(envelope.data["follow_up_id"], envelope.data["turn"])
            self.turn_on_lingering_session = not envelope.data.get("reprovision", False)
        elif envelope.type == TaskCompleted.type:
            self.state = "completed"
        elif envelope.type == TaskFailed.type:
            self.state = "failed"
        elif envelope.type == TaskCancelled.type:
            self.state = "cancelled"
