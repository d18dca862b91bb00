"""Live streams over WebSocket: a task's events, or every task's, from any stream sequence."""

from __future__ import annotations

import asyncio
import logging

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from events import task_subjects
from events.envelope import STREAM_SUBJECTS
from services.gateway.context import Gateway
from services.runtime.streams import stream_raw

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api", tags=["streams"])


@router.websocket("/tasks/{task_id}/stream")
async def task_stream(websocket: WebSocket, task_id: str, from_seq: int = 1) -> None:
    """Every event of the task with stream_seq ≥ from_seq, then the live ones; resume with last + 1."""
    await _serve(websocket, task_subjects(task_id), from_seq, exclude=frozenset())


@router.websocket("/stream")
async def board_stream(websocket: WebSocket, from_seq: int = 1, exclude: str = "") -> None:
    """The same for all tasks (the board's live feed); `exclude=AgentOutput` leaves out types."""
    excluded = frozenset(t for t in exclude.split(",") if t)
    await _serve(websocket, STREAM_SUBJECTS[0], from_seq, exclude=excluded)


async def _serve(websocket: WebSocket, subject: str, from_seq: int, *, exclude: frozenset[str]) -> None:
    if from_seq < 1:
        await websocket.close(code=1008, reason="from_seq must be 1 or more")
        return
    await websocket.accept()
    gateway: Gateway = websocket.app.state.gateway
    sender = asyncio.create_task(_send_events(websocket, gateway, subject, from_seq, exclude))
    listener = asyncio.create_task(_until_disconnected(websocket))
    try:
        await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sender, listener):
            task.cancel()
        await asyncio.gather(sender, listener, return_exceptions=True)


async def _send_events(
    websocket: WebSocket, gateway: Gateway, subject: str, from_seq: int, exclude: frozenset[str]
) -> None:
    try:
        async for batch in stream_raw(gateway.bus.js, subject, from_seq=from_seq):
            for event in batch:
                if event.type not in exclude:
                    # Awaiting each send is the back-pressure: nothing more is fetched meanwhile.
                    await websocket.send_text(event.json.decode())
    except (WebSocketDisconnect, RuntimeError):
        pass
    except Exception as error:  # NATS trouble: tell the viewer where to resume.
        log.warning("stream %s ended: %r", subject, error)
        await websocket.close(code=1011, reason="stream interrupted; resume with from_seq = last + 1")


async def _until_disconnected(websocket: WebSocket) -> None:
    try:
        while True:
            await websocket.receive_text()
    except (WebSocketDisconnect, RuntimeError):
        pass
