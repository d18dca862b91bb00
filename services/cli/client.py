"""A small client for Baton's HTTP API, used by the CLI."""

from __future__ import annotations

from typing import Any

import httpx


class ApiError(Exception):
    """The API answered with an error; str() is its message."""


class BatonClient:
    def __init__(self, api: str, *, timeout_s: float = 30.0) -> None:
        self.api = api.rstrip("/")
        self._http = httpx.Client(base_url=self.api, timeout=timeout_s)

    def _json(self, response: httpx.Response) -> Any:
        if response.is_error:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ApiError(f"{response.status_code}: {detail}")
        return response.json()

    def submit(self, *, repo: str, prompt: str, agent: str, base_branch: str | None) -> dict:
        body = {"repo": repo, "prompt": prompt, "agent": agent, "base_branch": base_branch}
        return self._json(self._http.post("/api/tasks", json=body))

    def task(self, task_id: str) -> dict:
        return self._json(self._http.get(f"/api/tasks/{task_id}"))

    def tasks(self) -> list[dict]:
        return self._json(self._http.get("/api/tasks"))["tasks"]

    def events(self, task_id: str, *, from_seq: int = 1) -> list[dict]:
        response = self._http.get(f"/api/tasks/{task_id}/events", params={"from_seq": from_seq})
        return self._json(response)["events"]

    def health(self) -> tuple[int, dict]:
        response = self._http.get("/api/health")
        return response.status_code, response.json()
