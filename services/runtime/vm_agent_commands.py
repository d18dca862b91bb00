"""What the control plane asks a vm_agent, over NATS request/reply: subjects and bodies, declared once.

A vm_agent only connects out (to the bus and the git origin); nothing on it listens. Two kinds of
subject, both outside the event stream (`baton.task.>`), so nothing said here is ever stored:

- `baton.vm.member.<vm_id>.assign|hello` — a vm_agent before it has a task, known by the identity
  it was started (or booted) with: it says `hello` once it is ready, and takes its assignment
  (task, workspace, the task's bus credential, the repo credential: secrets, in a core NATS
  request only) from the provisioner.
- `baton.vm.task.<task_id>.sessions|turns|cancel|permissions` — the assigned vm_agent answers its
  task's commands, sent by the task runner; `alive`, sent by the provisioner, asks whether it is
  still on the bus. Only that task's credential may subscribe to them.

Every reply is a `CommandReply` whose `status` keeps the meaning the HTTP status codes had (202
accepted, 409 conflict, 422 unacceptable, 404 unknown, 503 cannot serve), so callers' reasons stay
as clear. Requests are idempotent by the keys they carry (attempt id, turn, request id).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

MEMBER_PREFIX = "baton.vm.member"
TASK_PREFIX = "baton.vm.task"
ADDRESS_SCHEME = "nats:"
TASK_COMMANDS = ("sessions", "turns", "cancel", "permissions", "alive")
ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""Task ids and vm ids are single subject tokens: no dots, no wildcards."""


def member_subject(vm_id: str, command: Literal["assign", "hello"]) -> str:
    return f"{MEMBER_PREFIX}.{vm_id}.{command}"


def task_subject(task_id: str, command: str) -> str:
    return f"{TASK_PREFIX}.{task_id}.{command}"


def task_address(task_id: str) -> str:
    """Where the task's vm_agent is reached (WorkspaceReady's `vm_agent_url`): a bus address."""
    return f"{ADDRESS_SCHEME}{TASK_PREFIX}.{task_id}"


class RepoCredentialBody(BaseModel):
    host: str
    username: str = Field(repr=False)
    password: str = Field(default="", repr=False)


class CloneOrder(BaseModel):
    """What a vm_agent on its own machine clones before it answers its assignment (a cloud VM; a
    local vm_agent is handed the provisioner's clone instead): `repo` at `base_branch`, with git
    allowing only the control plane's `schemes` (the repo credential comes in the Assignment)."""

    repo: str
    base_branch: str | None = None
    schemes: list[str] = Field(default_factory=list)


class Assignment(BaseModel):
    """This vm_agent now serves `task_id` in `workspace`, recording into `state_dir`. Carries
    secrets: sent only as a core NATS request to the member's own subject, never logged."""

    task_id: str = Field(pattern=ID_PATTERN)
    workspace: Path
    state_dir: Path
    credential_expires_at: float = Field(description="Unix time after which the bus refuses the credential")
    nats_credentials: str | None = Field(default=None, repr=False)
    """This workspace's NATS credential (`.creds` text): its task's events and commands only."""
    repo_credential: RepoCredentialBody | None = Field(default=None, repr=False)
    """The repo URL's credential, for the push (kept in memory only)."""
    clone: CloneOrder | None = None
    """Set for a vm_agent on a machine of its own: it clones `workspace` itself (and keeps its git dir)."""


class Hello(BaseModel):
    """A vm_agent is connected and ready to be assigned (its warm agent started, or failed)."""

    vm_id: str = Field(pattern=ID_PATTERN)
    warm_agent: str | None = None
    warm_agent_state: str = "none"


class SessionStart(BaseModel):
    """Start `agent` on this workspace with `initial_prompt`; `attempt_id` is the idempotency key."""

    task_id: str
    agent: str
    initial_prompt: str = Field(min_length=1)
    attempt_id: str = Field(min_length=1)
    causation_id: str | None = None
    permission_policy: Literal["auto", "ask"] = "auto"
    """`ask`: a person answers each permission request (the `permissions` command)."""
    turn: int = Field(default=1, ge=1)
    """The turn `initial_prompt` is: above 1 on a workspace re-provisioned for a follow-up."""
    resume_session_id: str | None = Field(default=None, min_length=1, max_length=200)
    """The task's earlier ACP session: loaded (`session/load`) where the agent can, else a new one
    (AgentSessionStarted says which)."""


class SessionCancel(BaseModel):
    """Stop the agent of `task_id`'s attempt (`agent`: its kind, for a session that never started)."""

    task_id: str
    attempt_id: str = Field(min_length=1)
    agent: str


class TurnStart(BaseModel):
    """Run `prompt` as turn `turn` (2, 3, …: the idempotency key) of `task_id`'s agent session."""

    task_id: str
    attempt_id: str = Field(min_length=1)
    turn: int = Field(ge=2)
    prompt: str = Field(min_length=1)
    causation_id: str | None = None


class PermissionAnswer(BaseModel):
    """A person's answer to the open permission request `request_id` of `task_id`."""

    task_id: str
    request_id: str = Field(min_length=1)
    option_id: str = Field(min_length=1)


class AliveProbe(BaseModel):
    """Is the task's vm_agent on the bus? Any answer says yes (with its task and session state)."""


class CommandReply(BaseModel):
    """A vm_agent's answer: `status` as an HTTP status code would say it; `reason` for people
    when refused; `result` the command's own facts (e.g. `started_now`)."""

    status: int
    reason: str = ""
    result: dict = Field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return 200 <= self.status < 300

    @classmethod
    def refused(cls, status: int, reason: str) -> CommandReply:
        return cls(status=status, reason=reason)

    @classmethod
    def ok(cls, status: int = 200, **result: object) -> CommandReply:
        return cls(status=status, result=result)


COMMAND_BODIES: dict[str, type[BaseModel]] = {
    "sessions": SessionStart, "turns": TurnStart, "cancel": SessionCancel, "permissions": PermissionAnswer,
    "alive": AliveProbe,
}
"""Each task command's request body, by the last token of its subject."""
