"""`/api/health` and `/api/backends`."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.gateway.auth import is_authenticated
from services.gateway.context import GatewayDep
from services.runtime.bus import dead_letter_count
from services.runtime.agent_secrets import agent_environ
from vm_agent.backends import BACKENDS, AgentKind, refusal

router = APIRouter(prefix="/api", tags=["system"])


@router.get("/health")
async def health(gateway: GatewayDep, request: Request) -> JSONResponse:
    """200 only when NATS is connected and every service was heard from in the last seconds.

    `details` is what services say about themselves (the provisioner: its warm vm_agent pool).
    Without the API token (a liveness probe) the body is only `{"status"}`, with the same code.
    """
    services = gateway.heartbeats.status()
    services["gateway"] = True
    nats_ok = gateway.bus.nc.is_connected
    try:
        dead_letters = await asyncio.wait_for(dead_letter_count(gateway.bus.js), 2.0)
    except Exception:  # NATS down or slow: health says so through "nats".
        dead_letters = None
    faults = sorted(gateway.settings.faults)
    body = {
        "status": "ok" if nats_ok and all(services.values()) else "degraded",
        "nats": nats_ok,
        "services": services,
        "faults": faults,
        "dead_letters": dead_letters,
        "details": dict(gateway.heartbeats.details),
    }
    warnings = []
    if faults:
        warnings.append(f"FAULT INJECTION ON: {', '.join(faults)} will silently not happen")
    body["bus"] = "open" if getattr(request.app.state, "bus_open", False) else "authenticated"
    if body["bus"] == "open":
        warnings.append("THE BUS IS OPEN: NATS lets clients in without credentials, so anyone who "
                        "reaches it can forge events or delete the history (see README, Security model)")
    # How agents are confined, as the provisioner (which starts them) found it.
    body["sandbox"] = body["details"].get("provisioner", {}).get("sandbox", "unknown (no provisioner heard from)")
    if body["sandbox"].startswith(("none", "required")):
        warnings.append(f"NO AGENT SANDBOX: {body['sandbox']}")
    if warnings:
        body["warning"] = "; ".join(warnings)
    if not is_authenticated(request):
        body = {"status": body["status"]}
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)


@router.get("/backends")
def backends(gateway: GatewayDep) -> dict:
    """Every agent kind: its pinned adapter, whether it is installed here, whether its credentials
    are set (never their values), and so whether a task for it would be accepted."""
    agents_dir, environ = gateway.settings.agents_root, agent_environ(gateway.settings)
    return {"backends": [_backend(kind, agents_dir, environ) for kind in BACKENDS.values()]}


def _backend(kind: AgentKind, agents_dir: Path, environ: Mapping[str, str]) -> dict:
    missing = kind.missing_credentials(environ)
    return {
        "name": kind.name, "title": kind.title, "package": kind.package, "version": kind.version,
        "installed": kind.installed(agents_dir), "credentials": not missing,
        "missing_credentials": [list(group) for group in missing],
        "available": kind.available(agents_dir, environ),
        "fix": refusal(kind.name, agents_dir, environ),
    }
