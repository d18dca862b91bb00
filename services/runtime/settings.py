"""One settings class for every Baton process, read from `BATON_*` environment variables."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from events.flow import Deadline, parse_deadlines

KNOWN_FAULTS = frozenset({"prompt_delivery", "workspace_ready", "agent_output", "branch_push"})


class Settings(BaseSettings):
    """Where Baton keeps its data, how it reaches NATS, and what it may do.

    `baton up` passes these to every service it starts through the environment.
    """

    model_config = SettingsConfigDict(env_prefix="BATON_", extra="ignore")

    data_dir: Path = Field(default_factory=lambda: Path.home() / ".baton")
    nats_url: str = "nats://127.0.0.1:4222"
    host: str = "127.0.0.1"
    port: int = 8420
    warm_pool: int = Field(default=3, ge=0, le=64)
    """Local vm_agents kept started ahead of time (each with a shell agent warm); 0 turns it off."""
    vm_agent_bind: str = "127.0.0.1"
    vm_agent_advertise: str | None = None
    """The host name other services use to reach a local vm_agent (default: its bind address)."""
    database_url: str | None = Field(default=None, repr=False)
    """`postgresql://user:password@host:port/dbname`: every service store and read model in
    PostgreSQL (each in its own tables). Unset: SQLite files under the data dir."""
    faults: Annotated[frozenset[str], NoDecode] = frozenset()
    secret: str | None = Field(default=None, repr=False)

    deadlines: str = ""
    """Override flow deadlines: `"PromptDelivered=30,AgentOutput=120"` (seconds, by awaited event)."""
    stall_after_s: float = Field(default=300.0, gt=0)
    """A running agent silent this long is reported as AgentStalled."""
    overdue_backoff_s: Annotated[tuple[float, ...], NoDecode] = (1.0, 2.0, 4.0)
    """After StepOverdue the task runner retries (or waits) at these intervals, then fails the task."""

    @field_validator("deadlines")
    @classmethod
    def _check_deadlines(cls, value: str) -> str:
        parse_deadlines(value)
        return value

    @field_validator("overdue_backoff_s", mode="before")
    @classmethod
    def _parse_backoff(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(float(part) for part in value.split(",") if part.strip())
        return value

    @property
    def flow_deadlines(self) -> tuple[Deadline, ...]:
        return parse_deadlines(self.deadlines)

    @field_validator("faults", mode="before")
    @classmethod
    def _parse_faults(cls, value: object) -> object:
        if isinstance(value, str):
            value = {part.strip() for part in value.split(",") if part.strip()}
        unknown = set(value) - KNOWN_FAULTS if isinstance(value, (set, frozenset, list, tuple)) else set()
        if unknown:
            raise ValueError(
                f"unknown fault(s) {sorted(unknown)}; known: {sorted(KNOWN_FAULTS)}"
            )
        return value

    def path(self, *parts: str) -> Path:
        """A path under the data dir, its parent created."""
        target = self.data_dir.joinpath(*parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def install_secret(self) -> str:
        """The install's secret (vm_agent tokens derive from it); never logged, never in events."""
        if self.secret:
            return self.secret
        secret_file = self.path("secret")
        if not secret_file.exists():
            secret_file.touch(mode=0o600)
            secret_file.write_text(secrets.token_hex(32))
        return secret_file.read_text().strip()
