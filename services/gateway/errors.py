"""Refusals a client can read: 422 bodies that never echo what cannot be encoded, WebSocket
closes that carry their reason, and a 503 (not a 500) while the bus does not answer."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError, WebSocketRequestValidationError
from fastapi.responses import JSONResponse
from nats.errors import ConnectionClosedError, ConnectionReconnectingError, OutboundBufferLimitError

from services.runtime.bus import JETSTREAM_UNAVAILABLE

MAX_ECHO_CHARS = 200
"""How much of a refused value a 422 repeats (a 1 MB prompt is not sent back)."""
NOT_TEXT = ("is not text: it holds a lone surrogate (a \\ud800-\\udfff escape that is not half of a "
            "pair); send valid UTF-8")
BUS_UNAVAILABLE = (*JETSTREAM_UNAVAILABLE, ConnectionClosedError, ConnectionReconnectingError,
                   OutboundBufferLimitError)
"""What a request that reads or writes the bus meets while NATS is down or electing a leader:
passing, so the answer is 503 with a reason and a Retry-After, never a 500."""
RETRY_AFTER_S = 2
MAX_CLOSE_REASON_BYTES = 123
"""What a WebSocket close frame holds (RFC 6455: 125 bytes, 2 of them the code)."""


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, refuse_invalid_request)
    app.add_exception_handler(WebSocketRequestValidationError, refuse_invalid_websocket)
    for kind in BUS_UNAVAILABLE:
        app.add_exception_handler(kind, bus_unavailable)


async def bus_unavailable(request: Request, error: Exception) -> JSONResponse:
    """The event stream did not answer (a NATS node down, a leader election, NATS restarting):
    nothing was lost, and the same request will do once it answers again."""
    return JSONResponse(status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)}, content={
        "detail": f"the event bus is not answering right now ({type(error).__name__}: NATS down or "
                  f"electing a leader); try again in a few seconds"})


async def refuse_invalid_request(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, without the pieces that made it a 500 or a huge echo: each error's
    type, location and message, and the refused value only when short and printable."""
    return JSONResponse(status_code=422, content={"detail": [_readable(e) for e in error.errors()]})


async def refuse_invalid_websocket(websocket: WebSocket, error: WebSocketRequestValidationError) -> None:
    problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:]))}: {e['msg']}" for e in error.errors())
    await close_with_reason(websocket, 1008, _safe_text(problems))


async def close_with_reason(websocket: WebSocket, code: int, reason: str) -> None:
    """Accept, then close with `code` and `reason`: refused before accepting, a client sees only a
    bare HTTP 403 and never the reason."""
    await websocket.accept()
    await websocket.close(code=code, reason=_fit_close_frame(reason))


def _readable(error: dict[str, Any]) -> dict[str, Any]:
    message = NOT_TEXT if error["type"] == "string_unicode" else error["msg"]
    readable = {"type": error["type"], "loc": [_safe_text(str(part)) for part in error["loc"]],
                "msg": _safe_text(message)}
    value = error.get("input")
    if value is None or isinstance(value, (bool, int, float)):
        readable["input"] = value
    elif isinstance(value, str) and len(value) <= MAX_ECHO_CHARS:
        readable["input"] = _safe_text(value)
    return readable


def _safe_text(text: str) -> str:
    """`text` with anything UTF-8 cannot carry (a lone surrogate) written as its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _fit_close_frame(reason: str) -> str:
    encoded = reason.encode("utf-8")
    if len(encoded) <= MAX_CLOSE_REASON_BYTES:
        return reason
    return encoded[: MAX_CLOSE_REASON_BYTES - 3].decode("utf-8", "ignore") + "..."
