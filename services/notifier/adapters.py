"""The notifier's edges: HTTP to the endpoints, and the stream for a task's facts."""

from __future__ import annotations

import json
import logging

import httpx
from nats.js import JetStreamContext

from events import STREAM, stored_subject

log = logging.getLogger(__name__)


class HttpPoster:
    """POSTs with one pooled client; no redirects (a signed body goes only where it was sent)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client

    async def post(self, url: str, payload: bytes, headers: dict[str, str]) -> int:
        response = await self.client.post(url, content=payload, headers=headers)
        return response.status_code


class StreamTaskFacts:
    """A task's TaskSubmitted fields, read from the stream (one direct lookup, then cached)."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.known: dict[str, dict] = {}

    async def submitted(self, task_id: str) -> dict | None:
        if task_id not in self.known:
            try:
                message = await self.js.get_last_msg(STREAM, stored_subject(task_id, "TaskSubmitted"))
                self.known[task_id] = json.loads(message.data or b"{}").get("data", {})
            except Exception as error:  # Gone from the stream (its limits): the body says null.
                log.info("no TaskSubmitted for task %s on the stream: %s", task_id, type(error).__name__)
                return None
            if len(self.known) > 10_000:
                self.known.clear()
        return self.known.get(task_id)
