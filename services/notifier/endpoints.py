"""Where notifications go: the webhook endpoints configured for this install (they hold secrets)."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter, ValidationError, field_validator

from services.runtime.settings import Settings

NOTIFIABLE_TYPES = ("TaskCompleted", "TaskFailed", "TaskCancelled", "PermissionRequested", "PullRequestOpened")
"""The events an endpoint may ask for: a task ended, waits for a person, or opened a pull request."""


class NotifyConfigError(ValueError):
    """The endpoints' configuration cannot be used; the message says what to change (never a secret)."""


class Endpoint(BaseModel):
    """One webhook: `name` (shown in events and logs instead of its URL), the `events` it wants, its
    body's `format` and the `secret` its deliveries are signed with (HMAC-SHA256)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    url: SecretStr
    """Secret too: a Slack incoming webhook's path is its credential."""
    events: tuple[str, ...] = NOTIFIABLE_TYPES
    format: Literal["json", "slack"] = "json"
    secret: SecretStr = SecretStr("")

    @field_validator("events")
    @classmethod
    def _known_events(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = set(value) - set(NOTIFIABLE_TYPES)
        if unknown:
            raise ValueError(f"unknown event(s) {sorted(unknown)}; known: {', '.join(NOTIFIABLE_TYPES)}")
        return value

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("https://", "http://")):
            raise ValueError("url must start with https:// (or http:// for a local receiver)")
        return value

    def wants(self, event_type: str) -> bool:
        return event_type in self.events


_ENDPOINTS = TypeAdapter(list[Endpoint])


def load_endpoints(settings: Settings) -> tuple[Endpoint, ...]:
    """BATON_NOTIFY_WEBHOOKS, else `<data dir>/notifications.json`, else none. Names are unique."""
    text = settings.notify_webhooks
    source = "BATON_NOTIFY_WEBHOOKS"
    if text is None:
        path = settings.data_dir / "notifications.json"
        if not path.exists():
            return ()
        text, source = path.read_text(), str(path)
    return parse_endpoints(text, source=source)


def parse_endpoints(text: str, *, source: str) -> tuple[Endpoint, ...]:
    try:
        endpoints = tuple(_ENDPOINTS.validate_python(json.loads(text)))
    except json.JSONDecodeError as error:
        raise NotifyConfigError(f"{source} is not JSON: {error.msg} at line {error.lineno}") from None
    except ValidationError as error:  # Named by field and reason only: an input may be a secret.
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise NotifyConfigError(f"{source}: {problems}") from None
    names = [endpoint.name for endpoint in endpoints]
    if len(set(names)) != len(names):
        raise NotifyConfigError(f"{source}: endpoint names must be unique, got {names}")
    return endpoints
