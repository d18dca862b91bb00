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
    emitter: ClassVar[str]
    """Who may publish it: a service name or `vm_agent`. The bus enforces it (each credential may
    publish only its emitter's types: `services/runtime/nats_auth.py`)."""

    def __init_subclass__(cls, *, emitter: str = "", **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.type = cls.__name__
        cls.emitter = emitter


class TaskSubmitted(BaseEvent, emitter="gateway"):
    """Emitted by the gateway when a user submits a task (HTTP, CLI or UI).

    Promises: the task was validated and durably recorded; the task runner will take it.
    """

    repo: str
    prompt: str
    agent: str
    base_branch: str | None = None


class WorkspaceRequested(BaseEvent, emitter="task-runner"):
    """Emitted by the task runner: a workspace with the repo checked out is needed."""

    repo: str
    agent: str
    base_branch: str | None = None
    provider: str = "local"


class WorkspaceReady(BaseEvent, emitter="provisioner"):
    """Emitted by the provisioner once the repo is cloned and the workspace's vm_agent answers.

    Promises: `vm_agent_url` accepts `POST /sessions` for this task now, from whoever holds the
    workspace's token (derived from the install secret, the task id and `credential_expires_at`;
    never in an event), until `credential_expires_at` (Unix time).
    """

    workspace_id: str
    provider: str
    vm_agent_url: str
    credential_expires_at: float | None = None


class WorkspaceFailed(BaseEvent, emitter="provisioner"):
    """Emitted by the provisioner when no workspace could be made (e.g. the clone failed)."""

    reason: str


class AgentSessionStarted(BaseEvent, emitter="vm_agent"):
    """Emitted by the vm_agent once the agent process runs and has opened an ACP session."""

    session_id: str
    agent: str
    attempt_id: str


class PromptDelivered(BaseEvent, emitter="vm_agent"):
    """Emitted by the vm_agent once the agent has accepted the task's first prompt.

    Promises: the agent named by `session_id` received exactly the UTF-8 bytes whose SHA-256
    is `prompt_sha256`. Its absence after WorkspaceReady is a flow gap.
    """

    session_id: str
    prompt_sha256: str


class AgentOutput(BaseEvent, emitter="vm_agent"):
    """Emitted by the vm_agent for each piece of output of the agent, in order.

    Promises: `seq` is 1-based and contiguous per task; `text` is at most 64 KiB of UTF-8 (a
    longer line is split, never inside a character, so every event fits the bus). `continues`:
    the next AgentOutput of the same `stream` continues this line (join their texts to get it
    whole); false when the line ends here or, for agents that send chunks, as sent.
    """

    seq: int = Field(ge=1)
    stream: Literal["stdout", "stderr", "message", "tool"]
    text: str
    continues: bool = False


class AgentFinished(BaseEvent, emitter="vm_agent"):
    """Emitted by the vm_agent when the agent's prompt turn has ended."""

    stop_reason: str
    exit_code: int | None = None


class BranchPushed(BaseEvent, emitter="vm_agent"):
    """Emitted by the vm_agent once the workspace's changes are pushed to the origin.

    Promises: `branch` exists in the task's repo and points at `commit`.
    """

    branch: str
    commit: str


class SessionFailed(BaseEvent, emitter="vm_agent"):
    """Emitted by the vm_agent when the agent could not run or its work could not be pushed."""

    reason: str


class TaskCompleted(BaseEvent, emitter="task-runner"):
    """Emitted by the task runner: the agent's work is on `branch` in the origin."""

    branch: str
    commit: str


class TaskFailed(BaseEvent, emitter="task-runner"):
    """Emitted by the task runner (the only owner of a task's end): `reason` says why, for people."""

    reason: str


class StepOverdue(BaseEvent, emitter="monitor"):
    """Emitted by the flow monitor when a handoff did not happen within its deadline.

    Promises: `expected` had not been seen `waited_s` seconds after `after`, or the flow
    moved past `after` without it. This is a named gap, visible on the task.
    """

    expected: str
    after: str
    waited_s: float


class StepRecovered(BaseEvent, emitter="monitor"):
    """Emitted by the flow monitor when an overdue handoff arrives after all.

    `waited_s` is how long after `after` it finally came.
    """

    expected: str
    after: str
    waited_s: float


class AgentStalled(BaseEvent, emitter="monitor"):
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



def types_emitted_by(emitter: str) -> frozenset[str]:
    """The event types `emitter` publishes (a service name or `vm_agent`)."""
    return frozenset(name for name, cls in EVENT_TYPES.items() if cls.emitter == emitter)


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
