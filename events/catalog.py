"""Every domain event Baton publishes: who emits it and what it promises.

Nothing else defines an event's shape. A service builds an event here, wraps it in an
`Envelope` with `envelope_for`, and the relay puts it on the bus unchanged.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer

from events.envelope import Envelope
from events.versions import SCHEMA_VERSION_KEY, current_shape


class BaseEvent(BaseModel):
    """A domain event's own fields (the envelope's `data`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    type: ClassVar[str]
    emitter: ClassVar[str]
    """Who may publish it: a service name or `vm_agent`. The bus enforces it (each credential may
    publish only its emitter's types: `services/runtime/nats_auth.py`)."""
    schema_version: ClassVar[int]
    """The shape's version (1 unless the class says `version=`); raising it needs an upcaster from
    the one before (events/versions.py), so every event ever recorded still reads as this shape."""

    def __init_subclass__(cls, *, emitter: str = "", version: int = 1, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.type = cls.__name__
        cls.emitter = emitter
        cls.schema_version = version

    def model_dump(self, **kwargs: Any) -> dict[str, Any]:
        """The event's fields, and `schema_version` beside them once the type is past version 1
        (what every envelope's `data` is built from: `envelope_for`, the stores)."""
        data = super().model_dump(**kwargs)
        if self.schema_version != 1:
            data[SCHEMA_VERSION_KEY] = self.schema_version
        return data


class TaskSubmitted(BaseEvent, emitter="gateway"):
    """Emitted by the gateway when a user submits a task (HTTP, CLI or UI).

    Promises: the task was validated and durably recorded; the task runner will take it.
    """

    repo: str
    prompt: str
    agent: str
    base_branch: str | None = None
    permission_policy: Literal["auto", "ask"] = "auto"
    """How the agent's permission requests are answered: `auto` (allowed once, by the policy) or
    `ask` (a person answers each; unanswered after BATON_PERMISSION_TIMEOUT_S, it is rejected)."""
    provider: str = "local"
    """Where the task's workspace runs (`local`, `hetzner`): chosen at submit, else BATON_PROVIDER;
    the gateway accepted it only if it is configured there. Not written when `local`, as before."""
    pull_request: bool = True
    """Open a pull request once the branch is pushed (where the repo's host has a GitHub token);
    false: `--no-pr`. Not written when true."""
    draft: bool = False
    """The pull request is opened as a draft. Not written when false."""

    @model_serializer(mode="wrap")
    def _local_provider_as_before(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict) and self.provider == "local":
            data.pop("provider", None)
        if isinstance(data, dict) and self.pull_request and not self.draft:
            data.pop("pull_request", None)
            data.pop("draft", None)
        return data


class WorkspaceRequested(BaseEvent, emitter="task-runner"):
    """Emitted by the task runner: a workspace with the repo checked out is needed."""

    repo: str
    agent: str
    base_branch: str | None = None
    provider: str = "local"
    attempt: int = Field(default=1, ge=1)
    """The attempt the workspace is for: 1 (not written, as before attempts existed), then 2, 3…
    after an AttemptStarted (a lost workspace)."""

    @model_serializer(mode="wrap")
    def _first_attempt_as_before(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict) and self.attempt == 1:
            data.pop("attempt", None)
        return data


class AttemptStarted(BaseEvent, emitter="task-runner"):
    """Emitted by the task runner when a task's workspace was lost mid-run (SessionFailed with
    `lost_workspace`) and attempts remain (BATON_MAX_ATTEMPTS).

    Promises: attempt `attempt` (2, 3, …) starts now, for `reason`; a WorkspaceRequested with the
    same `attempt` follows at once, from `base_branch` (the task's branch if one was pushed, else
    the task's base branch), and the task's prompt is delivered again under attempt id
    `<task>-a<attempt>`. The flow contract then applies to this attempt; earlier attempts' handoffs
    and `AgentOutput.seq` are theirs (each attempt's output counts from 1). The task keeps its
    place (it does not queue again).
    """

    attempt: int = Field(ge=2)
    reason: str
    base_branch: str | None = None


class TaskQueued(BaseEvent, emitter="task-runner"):
    """Emitted by the task runner when a submitted task must wait for a place
    (BATON_MAX_RUNNING_TASKS tasks already hold one).

    Promises: the task waits, first come first served; `position` was its place in the line
    when it was queued (1 = next). Its WorkspaceRequested follows as soon as it gets a place, so
    until then its absence is not a gap. The board shows the current position (`queue_position`).
    """

    position: int
    max_running: int


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
    """Emitted by the vm_agent once the agent process runs and has opened an ACP session.

    `restored` says how a task's earlier agent session (asked for by `resumed_from`, the earlier
    ACP session id, on a workspace re-provisioned for a follow-up or a new attempt) was carried
    over: `loaded` (ACP `session/load`: the agent has the earlier conversation), or `new` (a new
    session: the agent cannot load sessions or the load failed; `restore_note` says which). Absent
    on a task's first session, as before sessions were restored."""

    session_id: str
    agent: str
    attempt_id: str
    resumed_from: str | None = None
    restored: Literal["loaded", "new"] | None = None
    restore_note: str | None = None

    @model_serializer(mode="wrap")
    def _first_session_as_before(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict):
            for name in ("resumed_from", "restored", "restore_note"):
                if data.get(name) is None:
                    data.pop(name, None)
        return data


class PromptDelivered(BaseEvent, emitter="vm_agent"):
    """Emitted by the vm_agent once the agent has accepted the task's first prompt.

    Promises: the agent named by `session_id` received exactly the UTF-8 bytes whose SHA-256
    is `prompt_sha256`. Its absence after WorkspaceReady is a flow gap. A follow-up
    (FollowUpSubmitted) is delivered the same way as turn `turn` (2, 3, …) of the same ACP
    session; the first prompt's event carries no `turn` (it is turn 1), as before turns existed.
    """

    session_id: str
    prompt_sha256: str
    turn: int = Field(default=1, ge=1)

    @model_serializer(mode="wrap")
    def _first_turn_as_before(self, handler: Any) -> Any:
        return _without_first_turn(self, handler(self))


def _without_first_turn(event: Any, data: Any) -> Any:
    """An event of turn 1 serialized exactly as before turns existed (no `turn`)."""
    if isinstance(data, dict) and event.turn == 1:
        data.pop("turn", None)
    return data


class AgentOutput(BaseEvent, emitter="vm_agent"):
    """Emitted by the vm_agent for each piece of output of the agent, in order.

    `stream`: "stdout"/"stderr" (the shell agent's lines), "message" (an ACP agent's text to the
    user), "thought" (its thinking, as it shares it). Promises: `seq` is 1-based and contiguous per attempt (AttemptStarted; per task when it ran once); `text` is at most 64 KiB of UTF-8 (a
    longer line is split, never inside a character, so every event fits the bus). `continues`:
    the next AgentOutput of the same `stream` continues this line (join their texts to get it
    whole); false when the line ends here or, for agents that send chunks, as sent.
    """

    seq: int = Field(ge=1)
    stream: Literal["stdout", "stderr", "message", "thought", "tool"]
    text: str
    continues: bool = False


TOOL_CALL_TEXT_MAX_BYTES = 64 * 1024
"""The most UTF-8 bytes of text (diffs, output, raw input) one tool-call event carries, all its
texts together: even escaped as JSON, its envelope stays far below the bus's 1 MiB payload limit."""


class FileDiff(BaseModel):
    """A change a tool call made to one file: `old_text` (None for a new file) became `new_text`.

    `truncated`: one of the texts was cut (its head kept) to fit the event; the whole change is in
    the workspace and on the pushed branch."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str
    old_text: str | None = None
    new_text: str
    truncated: bool = False


class FileLocation(BaseModel):
    """A file (and line) a tool call reads or changes, as the agent names it."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    path: str
    line: int | None = None


class ToolCallStarted(BaseEvent, emitter="vm_agent"):
    """Emitted by the vm_agent when the agent starts a tool call (ACP `tool_call`).

    Promises: `tool_call_id` is unique within the task's session; later ToolCallUpdated events
    with the same id describe this call. `kind` is ACP's (read, edit, delete, move, search,
    execute, think, fetch, switch_mode, other); `status` pending, in_progress, completed or
    failed. `raw_input` is the tool's input as JSON text (cut to fit: `truncated`). `diffs` and
    `output` as in ToolCallUpdated, when the call arrives with content already.
    """

    tool_call_id: str
    title: str
    kind: str = "other"
    status: str = "pending"
    locations: tuple[FileLocation, ...] = ()
    raw_input: str | None = None
    diffs: tuple[FileDiff, ...] = ()
    output: str | None = None
    truncated: bool = False


class ToolCallUpdated(BaseEvent, emitter="vm_agent"):
    """Emitted by the vm_agent when the agent reports progress of a tool call (ACP
    `tool_call_update`).

    Promises: refers to a `tool_call_id` of an earlier ToolCallStarted (or, for an agent that
    skips it, is the first word on that call). Fields left None did not change; `diffs` are the
    file changes the call reports, `output` its text output (terminal output included), both
    replacing earlier ones when given. `truncated`: some text of this event was cut (heads kept)
    so all its texts together stay within TOOL_CALL_TEXT_MAX_BYTES.
    """

    tool_call_id: str
    status: str | None = None
    title: str | None = None
    kind: str | None = None
    locations: tuple[FileLocation, ...] | None = None
    diffs: tuple[FileDiff, ...] = ()
    output: str | None = None
    truncated: bool = False


class PlanEntry(BaseModel):
    """One step of an agent's plan: `status` pending, in_progress or completed; `priority` high,
    medium or low."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    content: str
    status: str
    priority: str


class PlanUpdated(BaseEvent, emitter="vm_agent"):
    """Emitted by the vm_agent when the agent shares its plan (ACP `plan`).

    Promises: `entries` is the whole plan now (it replaces any earlier one), in the agent's order;
    each entry's content is at most 4 KiB, at most 200 entries (`truncated` if cut)."""

    entries: tuple[PlanEntry, ...]
    truncated: bool = False


class UsageRecorded(BaseEvent, emitter="vm_agent"):
    """Emitted by the vm_agent when the agent reports what the session consumed.

    `source` says where the numbers come from: "prompt_response" (ACP PromptResponse.usage: token
    counts for the turn), "prompt_response_meta" (token counts an agent puts in the response's
    `_meta`, as Gemini CLI does), "usage_update" (ACP `usage_update`: the context window's
    `context_used`/`context_size` and the session's cumulative cost, no input/output split).
    Counts an agent did not report are None. `cost_amount` is cumulative for the session, in
    `cost_currency` (ISO 4217), when the agent gives one.
    """

    source: str
    input_tokens: int | None = None
    output_tokens: int | None = None
    total_tokens: int | None = None
    cached_read_tokens: int | None = None
    cached_write_tokens: int | None = None
    thought_tokens: int | None = None
    context_used: int | None = None
    context_size: int | None = None
    cost_amount: float | None = None
    cost_currency: str | None = None


class PermissionOptionOffered(BaseModel):
    """A choice the agent offered: `kind` allow_once, allow_always, reject_once or reject_always."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    option_id: str
    name: str
    kind: str


class PermissionRequested(BaseEvent, emitter="vm_agent"):
    """Emitted by the vm_agent when the agent asks permission for a tool call (ACP
    `session/request_permission`), before it is answered.

    Promises: a PermissionAnswered with the same `request_id` follows (unless the session dies or
    the task is cancelled first). `request_id` is unique within the task."""

    request_id: str
    tool_call_id: str
    title: str
    options: tuple[PermissionOptionOffered, ...]


class PermissionAnswered(BaseEvent, emitter="vm_agent"):
    """Emitted by the vm_agent once a permission request was answered, and the answer sent.

    `outcome`: "selected" (then `option_id` is the option chosen) or "cancelled". `by` says who
    decided: "policy:auto" (the task's policy: allow once, never allow always), "user" (a person,
    under the `ask` policy: see PermissionAnswerGiven) or "timeout" (nobody answered in time: the
    request was rejected, `reason` says so)."""

    request_id: str
    option_id: str | None
    outcome: Literal["selected", "cancelled"]
    by: str
    reason: str | None = None


class PermissionAnswerGiven(BaseEvent, emitter="gateway"):
    """Emitted by the gateway when a person answers an open permission request (HTTP, CLI or UI)
    of a task under the `ask` policy.

    Promises: `option_id` was one of the options the request offered and the request had no answer
    yet; the task runner hands it to the task's vm_agent, which answers the agent and records
    PermissionAnswered (by "user"), unless the request timed out first."""

    request_id: str
    option_id: str
    by: str = "user"


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
    """Emitted by the vm_agent when the agent could not run or its work could not be pushed.

    `lost_workspace`: the vm_agent (or its machine) died mid-run and the provisioner's watcher
    ended the session for it; the work was lost with the workspace, not refused, so the task
    runner starts a new attempt (AttemptStarted) rather than failing the task.
    """

    reason: str
    lost_workspace: bool = False

    @model_serializer(mode="wrap")
    def _not_lost_as_before(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict) and not self.lost_workspace:
            data.pop("lost_workspace", None)
        return data


class TaskCompleted(BaseEvent, emitter="task-runner"):
    """Emitted by the task runner: the agent's work is on `branch` in the origin.

    After each turn's push: a follow-up sent while the workspace lingers (BATON_LINGER_S) runs
    as turn `turn` + 1 and the task completes again, `commit` then being that turn's. The first
    turn's event carries no `turn`, as before turns existed."""

    branch: str
    commit: str
    turn: int = Field(default=1, ge=1)

    @model_serializer(mode="wrap")
    def _first_turn_as_before(self, handler: Any) -> Any:
        return _without_first_turn(self, handler(self))


class TaskFailed(BaseEvent, emitter="task-runner"):
    """Emitted by the task runner (the only owner of a task's end): `reason` says why, for people."""

    reason: str


class TurnRequested(BaseEvent, emitter="task-runner"):
    """Emitted by the task runner when it starts a follow-up's turn (turn 2, 3, …).

    Promises: follow-up `follow_up_id` (its FollowUpSubmitted's event id) is now turn `turn`.
    `reprovision` false: it was handed to the task's lingering vm_agent (recorded once that vm_agent
    took it, so its PromptDelivered may be on the stream first), and its PromptDelivered (with this
    `turn`) follows within the PromptDelivered deadline. `reprovision` true: the workspace was
    released (WorkspaceReleased seen, or the vm_agent refused the turn: gone), so a
    WorkspaceRequested (attempt `attempt`, from the task's branch; no AttemptStarted: nothing was
    lost, and BATON_MAX_ATTEMPTS does not count it) follows in the same commit and the turn runs through the whole flow again (WorkspaceReady,
    AgentSessionStarted restoring the agent's session, PromptDelivered with this `turn`, …). The
    flow monitor judges each turn's handoffs from this event, with the same deadlines."""

    turn: int = Field(ge=2)
    follow_up_id: str
    reprovision: bool = False
    attempt: int = Field(default=1, ge=1)


class WorkspaceReleased(BaseEvent, emitter="provisioner"):
    """Emitted by the provisioner when a task's workspace (attempt `attempt`) is given up: its
    vm_agent exited after the task's last turn (idle past BATON_LINGER_S), or the task ended.
    Not emitted for a vm_agent lost mid-run (its SessionFailed `lost_workspace` says that).

    Promises: nothing of that workspace runs any more; a later follow-up re-provisions (a
    TurnRequested with `reprovision`). `reason` says why, for people."""

    workspace_id: str
    attempt: int = Field(default=1, ge=1)
    reason: str


class FollowUpSubmitted(BaseEvent, emitter="gateway"):
    """Emitted by the gateway when a person sends a follow-up prompt to a task (HTTP, CLI or UI).

    Promises: the prompt passed the same checks as a task's first prompt and is recorded; the
    task runner delivers each follow-up exactly once, in the order recorded, as the next turn of
    the task's agent session: at once if the agent is idle (the task `completed`, its workspace
    still lingering), else when the running turn's push is recorded. Its PromptDelivered carries
    the turn's number."""

    prompt: str


class TaskCancelRequested(BaseEvent, emitter="gateway"):
    """Emitted by the gateway when a person asks to cancel a task that had not ended (HTTP, CLI or UI).

    Promises: the intent is recorded, with who (`by`); the task runner acts on it: a queued task
    never starts, a running agent is stopped. TaskCancelled follows, unless the task ended first
    (a cancel that arrives after the agent's turn ended is too late: the branch is pushed)."""

    by: str
    reason: str | None = None


class TaskCancelled(BaseEvent, emitter="task-runner"):
    """Emitted by the task runner (the only owner of a task's end): the task was cancelled by `by`.

    Promises: nothing of the task runs any more (a queued task never started; a running agent
    was sent ACP `session/cancel`, given a short grace, then its process group was ended) and
    nothing is pushed after it. `pushed` says whether a branch was pushed before the cancel
    (`branch`, `commit` then name it)."""

    by: str
    reason: str | None = None
    pushed: bool = False
    branch: str | None = None
    commit: str | None = None


class PullRequestOpened(BaseEvent, emitter="pull-requests"):
    """Emitted by the pull-requests service once the task's branch has an open pull request on
    GitHub (one it opened, or the open one it found for the branch after a retried step).

    Promises: pull request `number` at `url` has head `head` (`baton/<task_id>`) and base `base`;
    at most one per task (a follow-up's turn updates it: PullRequestUpdated)."""

    url: str
    number: int = Field(ge=1)
    head: str
    base: str
    draft: bool = False
    turn: int = Field(default=1, ge=1)


class PullRequestUpdated(BaseEvent, emitter="pull-requests"):
    """Emitted by the pull-requests service when turn `turn` (a follow-up's) pushed to the branch
    of the task's pull request `number`: its description now tells that turn's work."""

    url: str
    number: int = Field(ge=1)
    turn: int = Field(ge=2)


class PullRequestFailed(BaseEvent, emitter="pull-requests"):
    """Emitted by the pull-requests service when the task's pull request could not be opened or
    updated after turn `turn`; `reason` is the GitHub API's answer (status and message, never a
    token). The task stays completed with its branch pushed."""

    reason: str
    turn: int = Field(default=1, ge=1)


class StepOverdue(BaseEvent, emitter="monitor"):
    """Emitted by the flow monitor when a handoff did not happen within its deadline.

    Promises: `expected` had not been seen `waited_s` seconds after `after`, or the flow
    moved past `after` without it. This is a named gap, visible on the task.
    """

    expected: str
    after: str
    waited_s: float
    turn: int = Field(default=1, ge=1)
    """The turn whose handoff is overdue (TurnRequested); absent for turn 1, as before turns existed."""

    @model_serializer(mode="wrap")
    def _first_turn_as_before(self, handler: Any) -> Any:
        return _without_first_turn(self, handler(self))


class StepRecovered(BaseEvent, emitter="monitor"):
    """Emitted by the flow monitor when an overdue handoff arrives after all.

    `waited_s` is how long after `after` it finally came.
    """

    expected: str
    after: str
    waited_s: float
    turn: int = Field(default=1, ge=1)
    """The turn the handoff belongs to; absent for turn 1."""

    @model_serializer(mode="wrap")
    def _first_turn_as_before(self, handler: Any) -> Any:
        return _without_first_turn(self, handler(self))


class AgentStalled(BaseEvent, emitter="monitor"):
    """Emitted by the flow monitor when a running agent produced no output for `silent_s` seconds."""

    silent_s: float
    last_seq: int
    turn: int = Field(default=1, ge=1)
    """The turn in which the agent went silent; absent for turn 1."""

    @model_serializer(mode="wrap")
    def _first_turn_as_before(self, handler: Any) -> Any:
        return _without_first_turn(self, handler(self))


class ServerRequested(BaseEvent, emitter="provisioner"):
    """Emitted by the provisioner before it asks a cloud for a task's server.

    Promises: a server named `name`, labelled with the install, the task and `attempt`, is asked
    for (in `locations`, in order, until one has room); ServerCreated or WorkspaceFailed follows.
    A server created but never announced (a provisioner killed meanwhile) is found by its labels.
    """

    provider: str
    name: str
    server_type: str
    locations: tuple[str, ...]
    attempt: int = Field(default=1, ge=1)


class ServerCreated(BaseEvent, emitter="provisioner"):
    """Emitted by the provisioner once the cloud finished creating (and starting) the server.

    Promises: server `server_id` of `server_type` runs in `location` and boots the vm_agent from
    its user_data; VmAgentConnected follows when that vm_agent calls home over the bus.
    """

    provider: str
    server_id: int
    server_type: str
    location: str
    attempt: int = Field(default=1, ge=1)


class VmAgentConnected(BaseEvent, emitter="provisioner"):
    """Emitted by the provisioner when a cloud workspace's vm_agent said hello on the bus with its
    workspace's member credential (the VM only connects out; the provisioner hears the hello).

    Promises: the vm_agent of `workspace_id` runs `version` (the control plane's) and can be assigned.
    """

    workspace_id: str
    version: str
    attempt: int = Field(default=1, ge=1)


class ServerDeleted(BaseEvent, emitter="provisioner"):
    """Emitted by the provisioner once a task's server is deleted (released, or reaped).

    Promises: server `server_id` no longer exists; it lived `seconds` and cost `cost_eur` (the
    server type's hourly net price in its location, from the API's `server_types`, times its
    life; None if the price was not known). `reason` says why it was deleted.
    """

    provider: str
    server_id: int
    reason: str
    seconds: float
    cost_eur: float | None = None
    attempt: int = Field(default=1, ge=1)


class NotificationDelivered(BaseEvent, emitter="notifier"):
    """Emitted by the notifier once webhook endpoint `endpoint` (its configured name) answered 2xx
    to the notification of event `event_id` (of type `event_type`, this task's) after `attempts`
    attempts. `delivery_id` is the stable id the receiver saw (header X-Baton-Delivery): a
    notifier killed between the POST and this record posts again with the same id.

    Promises: at most one per (`event_id`, `endpoint`); never a secret or an endpoint's URL."""

    endpoint: str
    event_id: str
    event_type: str
    delivery_id: str
    attempts: int = Field(ge=1)


class NotificationFailed(BaseEvent, emitter="notifier"):
    """Emitted by the notifier when it gave up on notifying `endpoint` of event `event_id` after
    `attempts` attempts (BATON_NOTIFY_MAX_ATTEMPTS, with exponential backoff); `reason` is the
    last attempt's (an HTTP status or a connection error, never a URL or a secret).

    Promises: at most one per (`event_id`, `endpoint`), and then no NotificationDelivered."""

    endpoint: str
    event_id: str
    event_type: str
    delivery_id: str
    attempts: int = Field(ge=1)
    reason: str


EVENT_TYPES: dict[str, type[BaseEvent]] = {
    cls.type: cls
    for cls in (
        TaskSubmitted,
        TaskQueued,
        AttemptStarted,
        WorkspaceRequested,
        WorkspaceReady,
        WorkspaceFailed,
        AgentSessionStarted,
        PromptDelivered,
        AgentOutput,
        ToolCallStarted,
        ToolCallUpdated,
        PlanUpdated,
        UsageRecorded,
        PermissionRequested,
        PermissionAnswered,
        PermissionAnswerGiven,
        AgentFinished,
        BranchPushed,
        SessionFailed,
        TaskCompleted,
        TaskFailed,
        TaskCancelRequested,
        FollowUpSubmitted,
        TurnRequested,
        WorkspaceReleased,
        TaskCancelled,
        PullRequestOpened,
        PullRequestUpdated,
        PullRequestFailed,
        StepOverdue,
        StepRecovered,
        AgentStalled,
        ServerRequested,
        ServerCreated,
        VmAgentConnected,
        ServerDeleted,
        NotificationDelivered,
        NotificationFailed,
    )
}



def types_emitted_by(emitter: str) -> frozenset[str]:
    """The event types `emitter` publishes (a service name or `vm_agent`)."""
    return frozenset(name for name, cls in EVENT_TYPES.items() if cls.emitter == emitter)


TERMINAL_TYPES = frozenset({TaskCompleted.type, TaskFailed.type, TaskCancelled.type})


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
    """The typed event inside an envelope, in its type's current shape (upcast from the version it
    was written in, unless a consumer did already: `current_shape`); raises KeyError for an unknown
    type."""
    cls = EVENT_TYPES[envelope.type]
    data = dict(current_shape(envelope).data)
    data.pop(SCHEMA_VERSION_KEY, None)
    return cls.model_validate(data)
