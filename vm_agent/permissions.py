"""Permission requests a person answers (the `ask` policy): each open request is a future the
agent's ACP request awaits, resolved by an answer over the vm_agent's API or by the timeout.

Nothing here blocks the event loop: the agent's request waits on its own future while the
vm_agent goes on recording, relaying and serving.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

DEFAULT_TIMEOUT_S = 600.0

Answering = Literal["answered", "already", "unknown", "not_offered", "closed"]
"""What became of an answer: `answered` now, `already` (the same option was given before: an
idempotent repeat), `unknown` request, an option `not_offered`, or `closed` (answered otherwise,
timed out, or the run is over)."""


@dataclass(frozen=True)
class Decision:
    """How a request was decided: `option_id` chosen (None: cancelled), `by` whom, and why."""

    option_id: str | None
    by: str
    reason: str | None = None


@dataclass
class _Open:
    options: tuple[str, ...]
    answer: asyncio.Future[str]


@dataclass
class PermissionDesk:
    """The open requests of one vm_agent's task and the answers given to them."""

    timeout_s: float = DEFAULT_TIMEOUT_S
    _open: dict[str, _Open] = field(default_factory=dict)
    _given: dict[str, str] = field(default_factory=dict)
    """request id → the option a person chose (kept so a repeated answer is recognised)."""
    _closed: set[str] = field(default_factory=set)

    def open(self, request_id: str, option_ids: Sequence[str]) -> None:
        """Register a request before it is recorded, so no answer can come before its future."""
        future = asyncio.get_running_loop().create_future()
        self._open[request_id] = _Open(tuple(option_ids), future)

    async def decision(self, request_id: str, *, reject_option: str | None) -> Decision:
        """The person's answer, or after `timeout_s` the rejection (`reject_option`, else cancelled)."""
        pending = self._open[request_id]
        try:
            async with asyncio.timeout(self.timeout_s):
                return Decision(await asyncio.shield(pending.answer), "user")
        except TimeoutError:
            return Decision(reject_option, "timeout",
                            f"nobody answered within {self.timeout_s:g}s: rejected")
        finally:
            self._open.pop(request_id, None)
            self._closed.add(request_id)
            if not pending.answer.done():
                pending.answer.cancel()

    def answer(self, request_id: str, option_id: str) -> Answering:
        """Give a person's answer to an open request (idempotent for the same option)."""
        if self._given.get(request_id) == option_id:
            return "already"
        pending = self._open.get(request_id)
        if pending is None:
            return "closed" if request_id in self._closed else "unknown"
        if option_id not in pending.options:
            return "not_offered"
        if pending.answer.done():
            return "closed"
        pending.answer.set_result(option_id)
        self._given[request_id] = option_id
        return "answered"

    def close(self) -> None:
        """The run is over: every request still open is cancelled."""
        for pending in self._open.values():
            with contextlib.suppress(asyncio.InvalidStateError):
                pending.answer.cancel()
