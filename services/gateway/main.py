"""Composition root of the gateway process."""

from __future__ import annotations

import logging

import uvicorn

from services.gateway.app import create_app
from services.gateway.auth import DenialLogFilter
from services.runtime.settings import Settings


async def run(settings: Settings) -> None:
    config = uvicorn.Config(
        create_app(settings), host=settings.host, port=settings.port, log_level="warning",
        lifespan="on",
        # Events are small and many: compressing each WebSocket message costs more than it saves.
        ws_per_message_deflate=False,
    )
    server = uvicorn.Server(config)  # Its config set up uvicorn's loggers: filter them now.
    logging.getLogger("uvicorn.error").addFilter(DenialLogFilter())
    await server.serve()
