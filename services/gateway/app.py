"""The gateway's FastAPI app and its lifetime (bus, store, relay, heartbeats)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.gateway.auth import ApiAuth
from services.gateway.body_limit import BodyLimit
from services.gateway.context import Gateway
from services.gateway.errors import install_error_handlers
from services.gateway.routes import audit as audit_routes
from services.gateway.routes import metrics as metrics_routes
from services.gateway.routes import events_contract
from services.gateway.routes import hooks as hook_routes
from services.gateway.routes import notifications as notification_routes
from services.gateway.routes import cancel, messages, permissions, streams, system, tasks, ui, vm_agent_dist
from services.projector.read_models import open_audit_log, open_task_board
from services.runtime.bus import StreamLimits, open_bus
from services.runtime.nats_auth import bus_is_open, service_credentials
from services.runtime.consumer import run_all
from services.runtime.heartbeat import HeartbeatBoard, send_heartbeats
from services.runtime.metrics import StreamMetrics
from services.runtime.relay import Relay
from services.runtime.settings import Settings
from services.runtime.tracing import handoff_trace_loops
from services.runtime.store import ServiceStore, store_env

NAME = "gateway"


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = ServiceStore(NAME, store_env(settings, NAME))
        board = open_task_board(settings)
        audit = open_audit_log(settings)
        async with open_bus(settings.nats_url, name=NAME, credentials=service_credentials(settings, NAME),
                           stream_limits=StreamLimits.from_settings(settings)) as bus:
            # Verified, not assumed: can a client without credentials get onto this bus?
            app.state.bus_open = await bus_is_open(settings.nats_url)
            relay = Relay(store, bus)
            heartbeats = HeartbeatBoard()
            await heartbeats.follow(bus.nc)
            app.state.gateway = Gateway(settings, store, relay, bus, board, audit, heartbeats)
            loops = asyncio.create_task(
                run_all(relay.run(), send_heartbeats(bus.nc, NAME, faults=settings.faults),
                        *handoff_trace_loops(audit))  # spans over OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set
            )
            try:
                yield
            finally:
                loops.cancel()
                await asyncio.gather(loops, return_exceptions=True)
                board.close()
                audit.close()

    app = FastAPI(title="Baton", version="0.1.0", lifespan=lifespan)
    app.state.stream_metrics = StreamMetrics()  # folded from the audit log at each scrape
    install_error_handlers(app)
    app.add_middleware(ApiAuth, settings=settings)  # every route, /docs and the WebSockets
    app.add_middleware(BodyLimit)  # outermost: nothing reads a body bigger than a task can be
    app.include_router(tasks.router)
    app.include_router(permissions.router)
    app.include_router(cancel.router)
    app.include_router(messages.router)
    app.include_router(system.router)
    app.include_router(metrics_routes.router)  # /metrics, where Prometheus looks for it
    app.include_router(streams.router)
    app.include_router(audit_routes.router)
    app.include_router(events_contract.router)
    app.include_router(notification_routes.router)
    app.include_router(hook_routes.router)  # GitHub's webhook (its own signature, not the token)
    app.include_router(vm_agent_dist.router)  # a cloud VM fetches its vm_agent (its own credential)
    app.include_router(ui.router)  # last: the web UI never shadows /api or /docs
    return app
