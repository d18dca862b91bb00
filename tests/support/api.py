"""Talking to a running stack the way a user's client does: over HTTP."""

from __future__ import annotations

from typing import Any

import httpx
import websockets

from events import TERMINAL_TYPES
from tests.support.waiting import wait_for


class Api:
    """The HTTP API as an authenticated client sees it (the bearer token on every request)."""

    def __init__(self, base_url: str, token: str) -> None:
        self.auth = {"Authorization": f"Bearer {token}"}
        self.http = httpx.Client(base_url=base_url, timeout=30, headers=self.auth)
        self.ws_base = base_url.rstrip("/").replace("http", "ws", 1)

    def stream(self, path: str, **options: Any) -> websockets.connect:
        """A WebSocket to `path` (`/api/stream?from_seq=1`), with the token: `async with api.stream(…)`."""
        return websockets.connect(f"{self.ws_base}{path}", additional_headers=self.auth, **options)

    def submit(self, **body: Any) -> dict:
        response = self.http.post("/api/tasks", json=body)
        assert response.status_code == 201, response.text
        return response.json()

    def events(self, task_id: str) -> list[dict]:
        response = self.http.get(f"/api/tasks/{task_id}/events")
        assert response.status_code == 200, response.text
        return response.json()["events"]

    def task(self, task_id: str) -> dict:
        response = self.http.get(f"/api/tasks/{task_id}")
        assert response.status_code == 200, response.text
        return response.json()

    def wait_for_end(self, task_id: str, *, timeout_s: float = 90) -> list[dict]:
        """The task's events up to its end (TaskCompleted, TaskFailed or TaskCancelled) once it is on
        the stream; what follows the end (its workspace's release, a late gap) is left out, so
        `events[-1]` is the end."""
        def ended() -> list[dict] | None:
            events = self.events(task_id)
            ends = [i for i, e in enumerate(events) if e["type"] in TERMINAL_TYPES]
            return events[: ends[-1] + 1] if ends else None

        return wait_for(ended, timeout_s=timeout_s, what=f"task {task_id} to end")

    def wait_for_state(self, task_id: str, state: str, *, timeout_s: float = 30) -> dict:
        return wait_for(lambda: (t := self.task(task_id))["state"] == state and t,
                        timeout_s=timeout_s, what=f"task {task_id} to be {state} on the board")


ENDED_STATES = ("completed", "failed", "cancelled")


def end_every_task(api: Api, *, timeout_s: float = 60) -> None:
    """Cancel every task on the board that has not ended, and wait until the board shows each ended."""
    def unended() -> list[str]:
        return [t["task_id"] for t in api.http.get("/api/tasks").json()["tasks"] if t["state"] not in ENDED_STATES]

    for task_id in unended():
        api.http.post(f"/api/tasks/{task_id}/cancel", json={"reason": "the test that started it is over"})
    wait_for(lambda: not unended(), timeout_s=timeout_s, what="every task on the board to have ended")
