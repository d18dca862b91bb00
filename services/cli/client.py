"""A small client for Baton's HTTP API, used by the CLI."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Optional

import httpx
import typer

from services.runtime.settings import Settings


class ApiError(Exception):
    """The API answered with an error; str() is its message."""


@dataclass(frozen=True)
class ApiToken:
    """The API token the CLI sends, and where it came from (for a message that says where it looked)."""

    value: str | None
    source: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.value}"} if self.value else {}

    def refused(self) -> str:
        """The one line to print when the API answers 401."""
        if self.value is None:
            return (f"the API wants a token and there is none: {self.source}. Pass --token, set "
                    "BATON_API_TOKEN, or set BATON_DATA_DIR to the data dir of the `baton up` you mean")
        return (f"the API refused the token from {self.source}: it is not this Baton's token "
                "(pass --token or BATON_API_TOKEN, or BATON_DATA_DIR of the `baton up` you mean)")


TokenOption = Annotated[Optional[str], typer.Option(
    "--token", help="the API token (else BATON_API_TOKEN, else <BATON_DATA_DIR or ~/.baton>/api-token)")]


def find_api_token(option: str | None = None) -> ApiToken:
    """`--token`, else BATON_API_TOKEN, else `<BATON_DATA_DIR or ~/.baton>/api-token` (never created here)."""
    if option:
        return ApiToken(option, "--token")
    settings = Settings()
    if settings.api_token:
        return ApiToken(settings.api_token, "BATON_API_TOKEN")
    path = settings.data_dir / "api-token"
    try:
        value = path.read_text().strip() or None
    except OSError:
        value = None
    looked = f"{path}" if value else f"no --token, no BATON_API_TOKEN and no readable {path}"
    return ApiToken(value, looked)


class BatonClient:
    def __init__(self, api: str, token: ApiToken, *, timeout_s: float = 30.0) -> None:
        self.api = api.rstrip("/")
        self.token = token
        self._http = httpx.Client(base_url=self.api, timeout=timeout_s, headers=token.headers)

    def _call(self, method: str, path: str, **options: Any) -> Any:
        """The API's JSON answer; an API that cannot be reached is an ApiError naming its URL."""
        try:
            response = self._http.request(method, path, **options)
        except httpx.TransportError as error:
            raise ApiError(f"cannot reach the Baton API at {self.api} ({error}): is `baton up` running "
                           "there? (--api or BATON_API)") from None
        return self._json(response)

    def _json(self, response: httpx.Response) -> Any:
        if response.status_code == 401:
            raise ApiError(self.token.refused())
        if response.is_error:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise ApiError(f"{response.status_code}: {detail}")
        return response.json()

    def submit(self, *, repo: str, prompt: str, agent: str, base_branch: str | None,
               permission_policy: str = "auto", provider: str | None = None,
               pull_request: bool = True, draft: bool = False) -> dict:
        """Submit a task; `provider` None: the install's default (BATON_PROVIDER)."""
        body = {"repo": repo, "prompt": prompt, "agent": agent, "base_branch": base_branch,
                "permission_policy": permission_policy, "pull_request": pull_request, "draft": draft}
        if provider is not None:
            body["provider"] = provider
        return self._call("POST", "/api/tasks", json=body)

    def permissions(self, task_id: str) -> list[dict]:
        return self._call("GET", f"/api/tasks/{task_id}/permissions")["permissions"]

    def answer_permission(self, task_id: str, request_id: str, option_id: str) -> dict:
        return self._call("POST", f"/api/tasks/{task_id}/permissions/{request_id}", json={"option_id": option_id})

    def task(self, task_id: str) -> dict:
        return self._call("GET", f"/api/tasks/{task_id}")

    def cancel(self, task_id: str, *, reason: str | None = None) -> dict:
        return self._call("POST", f"/api/tasks/{task_id}/cancel", json={"reason": reason})

    def say(self, task_id: str, prompt: str) -> dict:
        return self._call("POST", f"/api/tasks/{task_id}/messages", json={"prompt": prompt})

    def tasks(self) -> list[dict]:
        return self._call("GET", "/api/tasks")["tasks"]

    def events(self, task_id: str, *, from_seq: int = 1) -> list[dict]:
        return self._call("GET", f"/api/tasks/{task_id}/events", params={"from_seq": from_seq})["events"]

    def health(self) -> tuple[int, dict]:
        response = self._http.get("/api/health")
        return response.status_code, response.json()
