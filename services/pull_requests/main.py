"""Composition root of the pull-requests process."""

from __future__ import annotations

from typing import Any

from events import task_subjects
from services.pull_requests.github import GitHubClient, GitHubHost, github_token
from services.pull_requests.handlers import PullRequests
from services.runtime.bus import Bus, StreamLimits, open_bus
from services.runtime.nats_auth import service_credentials
from services.runtime.service import serve
from services.runtime.settings import Settings
from services.runtime.store import ServiceStore, store_env
from services.runtime.streams import stream_events

NAME = "pull-requests"


async def run(settings: Settings) -> None:
    store = ServiceStore(NAME, store_env(settings, NAME))
    host = GitHubHost.of(settings)
    api = GitHubClient(host.api_url, github_token(settings) or "") if host else None
    public_url = settings.public_url or f"http://{settings.host}:{settings.port}"
    try:
        async with open_bus(settings.nats_url, name=NAME, credentials=service_credentials(settings, NAME),
                           stream_limits=StreamLimits.from_settings(settings)) as bus:
            handlers = PullRequests(store, host=host, api=api, task_events=_task_events(bus),
                                    public_url=public_url)
            await serve(bus, name=NAME, settings=settings, store=store, subscriptions=handlers.subscriptions())
    finally:
        if api is not None:
            await api.aclose()


def _task_events(bus: Bus):
    async def read(task_id: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        async for batch in stream_events(bus.js, task_subjects(task_id), follow=False):
            events.extend(batch)
        return events
    return read
