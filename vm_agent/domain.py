"""The Session aggregate: one agent run in this workspace, as the vm_agent records it."""

from __future__ import annotations

from eventsourcing.domain import event

from events import (
    AgentFinished,
    AgentOutput,
    AgentSessionStarted,
    BranchPushed,
    Envelope,
    PermissionAnswered,
    PermissionRequested,
    PlanUpdated,
    PromptDelivered,
    SessionFailed,
    ToolCallStarted,
    ToolCallUpdated,
    UsageRecorded,
)
from services.runtime.store import TaskAggregate

ACTOR = "vm_agent"

OUTPUT_PIECE_BYTES = 64 * 1024
"""The most UTF-8 bytes one AgentOutput carries: even escaped as JSON (at most 6 bytes a byte),
its envelope fits the bus's 1 MB payload limit."""


def pieces_of(text: str, max_bytes: int = OUTPUT_PIECE_BYTES) -> list[str]:
    """`text` cut into pieces of at most `max_bytes` UTF-8 bytes, never inside a character."""
    if len(text) * 4 <= max_bytes:  # The usual line: fits whatever its characters.
        return [text]
    data = text.encode("utf-8", "surrogatepass")
    pieces, start = [], 0
    while len(data) - start > max_bytes:
        end = start + max_bytes
        while data[end] & 0xC0 == 0x80:  # A continuation byte: cut before its character instead.
            end -= 1
        pieces.append(data[start:end].decode("utf-8", "surrogatepass"))
        start = end
    pieces.append(data[start:].decode("utf-8", "surrogatepass"))
    return pieces


TurnEvent = ToolCallStarted | ToolCallUpdated | PlanUpdated | UsageRecorded | PermissionRequested | PermissionAnswered
"""What an agent's turn reports besides its output: its tool calls, plan, usage and permissions."""


class Session(TaskAggregate):
    """Started → prompt delivered → output 1..n → finished → pushed (or failed); after a push,
    a follow-up begins the next turn (prompt delivered → … → pushed) in the same agent session."""

    @event("Opened")
    def __init__(self, task_id: str, attempt_id: str, agent: str, cause: str | None, turn: int = 1) -> None:
        """`turn`: the turn its first prompt is (above 1 on a workspace re-provisioned for a follow-up)."""
        super().__init__(task_id)
        self.attempt_id = attempt_id
        self.agent = agent
        self.cause = cause
        self.session_id: str | None = None
        self.output_count = 0
        self.ended = False
        self.turn = turn
        self.pushed_turn = 0
        """The last turn whose work was pushed: only a pushed turn's session takes a follow-up."""

    @event("TurnBegun")
    def begin_turn(self, turn: int, cause: str | None) -> None:
        """A follow-up (turn 2, 3, …) now runs in this session; its events follow the turn before's."""
        self.turn, self.cause, self.ended = turn, cause, False

    def started(self, session_id: str, *, resumed_from: str | None = None, restored: str | None = None,
                restore_note: str | None = None) -> None:
        event = AgentSessionStarted(session_id=session_id, agent=self.agent, attempt_id=self.attempt_id,
                                    resumed_from=resumed_from, restored=restored, restore_note=restore_note)
        self.emit(event, actor=ACTOR, causation_id=self.cause)

    def prompt_delivered(self, prompt_sha256: str) -> None:
        assert self.session_id is not None
        event = PromptDelivered(session_id=self.session_id, prompt_sha256=prompt_sha256, turn=self.turn)
        self.emit(event, actor=ACTOR, causation_id=self.cause)

    def output(self, stream: str, text: str, *, continues: bool = False) -> int:
        """Record a piece of the agent's output, split into AgentOutputs that fit the bus (each
        but the last marked `continues`; the last as given); returns how many were recorded."""
        pieces = pieces_of(text)
        last = len(pieces) - 1
        for index, piece in enumerate(pieces):
            event = AgentOutput(seq=self.output_count + 1, stream=stream, text=piece,
                                continues=continues or index < last)
            self.emit(event, actor=f"agent:{self.agent}", causation_id=self.cause)
        return len(pieces)

    def reported(self, event: TurnEvent) -> None:
        """Record what the agent reported in its turn (a permission's answer is the vm_agent's own)."""
        actor = ACTOR if isinstance(event, PermissionAnswered) else f"agent:{self.agent}"
        self.emit(event, actor=actor, causation_id=self.cause)

    def finished(self, stop_reason: str, exit_code: int | None) -> None:
        event = AgentFinished(stop_reason=stop_reason, exit_code=exit_code)
        self.emit(event, actor=f"agent:{self.agent}", causation_id=self.cause)

    def pushed(self, branch: str, commit: str) -> None:
        self.emit(BranchPushed(branch=branch, commit=commit), actor=ACTOR, causation_id=self.cause)

    def failed(self, reason: str, *, lost_workspace: bool = False) -> None:
        event = SessionFailed(reason=reason, lost_workspace=lost_workspace)
        self.emit(event, actor=ACTOR, causation_id=self.cause)

    @staticmethod
    def ends(envelope: Envelope) -> bool:
        """Whether the session is over once this envelope is recorded (nothing follows it)."""
        return envelope.type in (BranchPushed.type, SessionFailed.type) or (
            envelope.type == AgentFinished.type and envelope.data["stop_reason"] != "end_turn")

    def apply(self, envelope: Envelope) -> None:
        if envelope.type == AgentSessionStarted.type:
            self.session_id = envelope.data["session_id"]
        elif envelope.type == AgentOutput.type:
            self.output_count = envelope.data["seq"]
        elif self.ends(envelope):
            self.ended = True
            if envelope.type == BranchPushed.type:
                self.pushed_turn = self.turn
