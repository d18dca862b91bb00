"""Live streams over WebSocket: a task's events, or every task's, from any stream sequence."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from events import task_subjects
from events.envelope import STREAM_SUBJECTS, task_id_problem
from services.gateway.context import Gateway
from services.gateway.errors import close_with_reason
from services.gateway.history import start_of_last
from services.gateway.limits import MAX_STREAM_SEQ
from services.runtime.streams import RawEvent, stream_raw

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api", tags=["streams"])


# A batched message stays under this size (one event bigger than it goes alone).
BATCH_MESSAGE_BYTES = 256 * 1024
MAX_LAST = 10_000


@router.websocket("/tasks/{task_id}/stream")
async def task_stream(
    websocket: WebSocket, task_id: str, from_seq: int = 1, batch: bool = False, last: int | None = None
) -> None:
    """Every event of the task with stream_seq ≥ from_seq, then the live ones; resume with last + 1.

    With `batch=1` each message is a JSON array of one or more events (in order) instead of one event.
    With `last=N` it starts at the task's N-th newest event (a late viewer's screenful first).
    """
    if (problem := task_id_problem(task_id)) is not None:
        await close_with_reason(websocket, 1008, problem)
        return
    if last is not None:
        if not 1 <= last <= MAX_LAST:
            await close_with_reason(websocket, 1008, f"last must be 1 to {MAX_LAST} (events from the newest)")
            return
        gateway: Gateway = websocket.app.state.gateway
        from_seq = max(from_seq, await start_of_last(gateway.bus.js, task_subjects(task_id), last))
    await _serve(websocket, task_subjects(task_id), from_seq, exclude=frozenset(), batched=batch)


@router.websocket("/stream")
async def board_stream(websocket: WebSocket, from_seq: int = 1, exclude: str = "", batch: bool = False) -> None:
    """The same for all tasks (the board's live feed); `exclude=AgentOutput` leaves out types."""
    excluded = frozenset(t for t in exclude.split(",") if t)
    await _serve(websocket, STREAM_SUBJECTS[0], from_seq, exclude=excluded, batched=batch)


async def _serve(
    websocket: WebSocket, subject: str, from_seq: int, *, exclude: frozenset[str], batched: bool
) -> None:
    if not 1 <= from_seq <= MAX_STREAM_SEQ:
        reason = f"from_seq must be 1 to {MAX_STREAM_SEQ} (a stream_seq; 1 = from the start)"
        await close_with_reason(websocket, 1008, reason)
        return
    gateway: Gateway = websocket.app.state.gateway
    if not gateway.viewers.take():
        await close_with_reason(websocket, 1013, gateway.viewers.refusal)
        return
    try:
        await websocket.accept()
        await _serve_accepted(websocket, gateway, subject, from_seq, exclude, batched)
    finally:
        gateway.viewers.give_back()


async def _serve_accepted(
    websocket: WebSocket, gateway: Gateway, subject: str, from_seq: int, exclude: frozenset[str], batched: bool
) -> None:
    sender = asyncio.create_task(_send_events(websocket, gateway, subject, from_seq, exclude, batched))
    listener = asyncio.create_task(_until_disconnected(websocket))
    try:
        await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sender, listener):
            task.cancel()
        await asyncio.gather(sender, listener, return_exceptions=True)


async def _send_events(
    websocket: WebSocket, gateway: Gateway, subject: str, from_seq: int, exclude: frozenset[str], batched: bool
) -> None:
    send = websocket.send
    try:
        # The reader leaves out excluded types and holds at most one window of events: it lets
        # JetStream send more only as these are sent, so a slow viewer slows only itself.
        async for events in stream_raw(gateway.bus.js, subject, from_seq=from_seq, exclude=exclude):
            if batched:
                for message in _arrays(events):
                    await send({"type": "websocket.send", "text": message})
            else:
                for event in events:
                    await send({"type": "websocket.send", "text": event.json.decode()})
    except (WebSocketDisconnect, RuntimeError):
        pass
    except Exception as error:  # NATS trouble: tell the viewer where to resume.
        log.warning("stream %s ended: %r", subject, error)
        await websocket.close(code=1011, reason="stream interrupted; resume with from_seq = last + 1")


def _arrays(events: list[RawEvent]) -> Iterator[str]:
    """The events as JSON arrays, each under BATCH_MESSAGE_BYTES (or of one event)."""
    start, size = 0, 0
    for i, event in enumerate(events):
        size += len(event.json) + 1
        if size > BATCH_MESSAGE_BYTES and i > start:
            yield "[%s]" % b",".join(e.json for e in events[start:i]).decode()
            start, size = i, len(event.json) + 1
    yield "[%s]" % b",".join(e.json for e in events[start:]).decode()


async def _until_disconnected(websocket: WebSocket) -> None:
    try:
        while True:
            await websocket.receive_text()
    except (WebSocketDisconnect, RuntimeError):
        pass
