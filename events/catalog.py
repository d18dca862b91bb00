"""Every domain event Baton publishes: who emits it and what it promises.

Nothing else defines an event's shape. A service builds an event here, wraps it in an
`Envelope` with `envelope_for`, and the relay puts it on the bus unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from events.envelope import Envelope


class BaseEvent(BaseModel):
    """A domain event's own fields (the envelope's `data`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.type = cls.__name__


class TaskSubmitted(BaseEvent):
    """Emitted by the gateway when a user submits a task (HTTP, CLI or UI).

    Promises: the task was validated and durably recorded; the task runner will take it.
    """

    repo: str
    prompt: str
    agent: str
    base_branch: str | None = None


class WorkspaceRequested(BaseEvent):
    """Emitted by the task runner: a workspace with the repo checked out is needed."""

    repo: str
    agent: str
    base_branch: str | None = None
    provider: str = "local"


class WorkspaceReady(BaseEvent):
    """Emitted by the provisioner once the repo is cloned and the workspace's vm_agent answers.

    Promises: `vm_agent_url` accepts `POST /sessions` for this task now.
    """

    workspace_id: str
    provider: str
    vm_agent_url: str


class WorkspaceFailed(BaseEvent):
    """Emitted by the provisioner when no workspace could be made (e.g. the clone failed)."""

    reason: str


class AgentSessionStarted(BaseEvent):
    """Emitted by the vm_agent once the agent process runs and has opened an ACP session."""

    session_id: str
    agent: str
    attempt_id: str


class PromptDelivered(BaseEvent):
    """Emitted by the vm_agent once the agent has accepted the task's first prompt.

    Promises: the agent named by `session_id` received exactly the UTF-8 bytes whose SHA-256
    is `prompt_sha256`. Its absence after WorkspaceReady is a flow gap.
    """

    session_id: str
    prompt_sha256: str


class AgentOutput(BaseEvent):
    """Emitted by the vm_agent for each piece of output of the agent, in order.

    Promises: `seq` is 1-based and contiguous per task.
    """

    seq: int = Field(ge=1)
    stream: Literal["stdout", "stderr", "message", "tool"]
    text: str


class AgentFinished(BaseEvent):
    """Emitted by the vm_agent when the agent's prompt turn has ended."""

    stop_reason: str
    exit_code: int | None = None


class BranchPushed(BaseEvent):
    """Emitted by the vm_agent once the workspace's changes are pushed to the origin.

    Promises: `branch` exists in the task's repo and points at `commit`.
    """

    branch: str
    commit: str


class SessionFailed(BaseEvent):
    """Emitted by the vm_agent when the agent could not run or its work could not be pushed."""

    reason: str


class TaskCompleted(BaseEvent):
    """Emitted by the task runner: the agent's work is on `branch` in the origin."""

    branch: str
    commit: str


class TaskFailed(BaseEvent):
    """Emitted by the task runner (the only owner of a task's end): `reason` says why, for people."""

    reason: str


class StepOverdue(BaseEvent):
    """Emitted by the flow monitor when a handoff did not happen within its deadline.

    Promises: `expected` had not been seen `waited_s` seconds after `after`, or the flow
    moved past `after` without it. This is a named gap, visible on the task.
    """

    expected: str
    after: str
    waited_s: float


class StepRecovered(BaseEvent):
    """Emitted by the flow monitor when an overdue handoff arrives after all.

    `waited_s` is how long after `after` it finally came.
    """

    expected: str
    after: str
    waited_s: float


class AgentStalled(BaseEvent):
    """Emitted by the flow monitor when a running agent produced no output for `silent_s` seconds."""

    silent_s: float
    last_seq: int


EVENT_TYPES: dict[str, type[BaseEvent]] = {
    cls.type: cls
    for cls in (
        TaskSubmitted,
        WorkspaceRequested,
        WorkspaceReady,
        WorkspaceFailed,
        AgentSessionStarted,
        PromptDelivered,
        AgentOutput,
        AgentFinished,
        BranchPushed,
        SessionFailed,
        TaskCompleted,
        TaskFailed,
        StepOverdue,
        StepRecovered,
        AgentStalled,
    )
}

TERMINAL_TYPES = frozenset({TaskCompleted.type, TaskFailed.type})


def envelope_for(
    event: BaseEvent, *, task_id: str, actor: str, causation_id: str | None = None
) -> Envelope:
    """Wrap an event for the bus."""
    return Envelope(
        type=event.type,
        task_id=task_id,
        actor=actor,
        causation_id=causation_id,
        data=event.model_dump(mode="json"),
    )


def parse_event(envelope: Envelope) -> BaseEvent:
    """The typed event inside an envelope; raises KeyError for an unknown type."""
    return EVENT_TYPES[envelope.type].model_validate(envelope.data)
