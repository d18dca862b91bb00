"""A task's permission requests as the stream tells them, and whether a person's answer fits."""

from __future__ import annotations

import asyncio
from typing import Any

from nats.js import JetStreamContext

from events import PermissionAnswered, PermissionRequested
from events.envelope import stored_subject
from services.runtime.streams import stream_events


class AnswerRefused(Exception):
    """A person's answer that cannot be taken; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def _events_of(js: JetStreamContext, task_id: str, event_type: str) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    async for batch in stream_events(js, stored_subject(task_id, event_type), follow=False):
        found.extend(batch)
    return found


async def permission_requests(js: JetStreamContext, task_id: str) -> list[dict[str, Any]]:
    """Every permission request of the task in order, each with its answer (None while open):
    `{"request_id", "tool_call_id", "title", "options", "requested_at", "event_id", "stream_seq", "answer"}`."""
    asked, answered = await asyncio.gather(_events_of(js, task_id, PermissionRequested.type),
                                           _events_of(js, task_id, PermissionAnswered.type))
    answers = {event["data"]["request_id"]: event["data"] | {"at": event["occurred_at"]} for event in answered}
    return [event["data"] | {"requested_at": event["occurred_at"], "event_id": event["event_id"],
                             "stream_seq": event["stream_seq"], "answer": answers.get(event["data"]["request_id"])}
            for event in asked]


def check_answer(requests: list[dict[str, Any]], given: dict[str, str], request_id: str, option_id: str) -> bool:
    """Whether the answer is new (True) or a repeat of the same answer (False); raises
    AnswerRefused: 404 for an unknown request, 409 if it was answered (or timed out), 422 for an
    option it did not offer."""
    request = next((r for r in requests if r["request_id"] == request_id), None)
    if request is None:
        raise AnswerRefused(404, f"no permission request {request_id!r} in this task")
    if request_id in given:
        if given[request_id] == option_id and request["answer"] is None:
            return False
        raise AnswerRefused(409, f"permission request {request_id!r} was already answered "
                                 f"({given[request_id]!r})")
    if request["answer"] is not None:
        answer = request["answer"]
        raise AnswerRefused(409, f"permission request {request_id!r} was already answered by {answer['by']}"
                                 + (f": {answer['reason']}" if answer.get("reason") else ""))
    offered = [option["option_id"] for option in request["options"]]
    if option_id not in offered:
        raise AnswerRefused(422, f"option {option_id!r} was not offered; choose one of {', '.join(offered)}")
    return True
