"""What the gateway's routes work with, built once at startup."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from projections.audit_log import AuditLog
from projections.task_board import TaskBoard
from services.runtime.bus import Bus
from services.runtime.credentials import CredentialVault
from services.runtime.heartbeat import HeartbeatBoard
from services.runtime.relay import Relay
from services.runtime.settings import Settings
from services.runtime.store import ServiceStore


@dataclass
class Gateway:
    settings: Settings
    store: ServiceStore
    relay: Relay
    bus: Bus
    board: TaskBoard
    audit: AuditLog
    heartbeats: HeartbeatBoard
    credentials: CredentialVault = field(init=False)
    """Where a repo URL's credential is sealed for its task (never recorded)."""

    def __post_init__(self) -> None:
        self.credentials = CredentialVault.of(self.settings)


def get_gateway(request: Request) -> Gateway:
    return request.app.state.gateway


GatewayDep = Annotated[Gateway, Depends(get_gateway)]
