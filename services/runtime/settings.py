"""One settings class for every Baton process, read from `BATON_*` environment variables."""

from __future__ import annotations

import fcntl
import os
import secrets
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from events.flow import Deadline, parse_deadlines
from services.runtime.repo_url import KNOWN_SCHEMES as KNOWN_REPO_SCHEMES

KNOWN_FAULTS = frozenset({"prompt_delivery", "workspace_ready", "agent_output", "branch_push",
                          "follow_up_delivery", "follow_up_push"})
"""Handoffs a rehearsal makes silently not happen; `follow_up_*`: only a follow-up's (turn 2, 3, …)."""


class Settings(BaseSettings):
    """Where Baton keeps its data, how it reaches NATS, and what it may do.

    `baton up` passes these to every service it starts through the environment.
    """

    model_config = SettingsConfigDict(env_prefix="BATON_", extra="ignore")

    data_dir: Path = Field(default_factory=lambda: Path.home() / ".baton")
    nats_url: str = "nats://127.0.0.1:4222"
    """The bus: one URL, or a cluster's as a comma-separated list (`nats_server_urls`)."""
    replica: Annotated[tuple[int, int], NoDecode] = (0, 1)
    """This process's place among its service's replicas, `"INDEX/COUNT"` from 0 (BATON_REPLICA;
    `baton up --replicas N` sets it): replica 1 of `"1/3"` is the second of three."""
    host: str = "127.0.0.1"
    port: int = 8420
    agents_dir: Path | None = None
    """Where `baton agents install` puts the agents' adapters (`<name>-<version>/`); unset:
    `<data dir>/agents`. Agents read it (read-only) in their sandbox."""
    warm_pool: int = Field(default=3, ge=0, le=64)
    """Local vm_agents kept started ahead of time (each with a shell agent warm); 0 turns it off."""
    task_nice: int = Field(default=5, ge=0, le=19)
    """How much lower the CPU priority (nice) of a task's vm_agent, agent and everything they run
    is than Baton's services': a burst of new tasks is cloned and started while running tasks wait
    for the CPU, not the other way round. 0: the same priority."""
    warm_pool_max: int = Field(default=16, ge=0, le=256)
    """The most members the warm pool grows to after a burst of tasks (it keeps, by kind, as many
    ready as were taken in the busiest few seconds of the last ten minutes; never fewer than its
    mix). Each idle member holds memory (docs/benchmarks.md: memory per task); 0 keeps the mix."""
    warm_agents: Annotated[dict[str, int], NoDecode] = Field(default_factory=dict)
    """The warm pool by agent kind, `"shell=3,claude=1"` (replaces BATON_WARM_POOL's shell agents):
    a task for a kind kept warm starts with its agent already up. Kinds not ready here (adapter not
    installed, no credentials) are skipped."""
    database_url: str | None = Field(default=None, repr=False)
    """`postgresql://user:password@host:port/dbname`: every service store and read model in
    PostgreSQL (each in its own tables). Unset: SQLite files under the data dir."""
    faults: Annotated[frozenset[str], NoDecode] = frozenset()
    secret: str | None = Field(default=None, repr=False)

    # --- Safety (issue 11): who may talk to Baton, and how much it takes in. ---
    api_token: str | None = Field(default=None, repr=False)
    """The API's bearer token; unset: `<data dir>/api-token`, created on first use (0600)."""
    allowed_hosts: Annotated[frozenset[str], NoDecode] = frozenset()
    """Host names (besides localhost, 127.0.0.1 and [::1]) the gateway answers to: `"baton.example.com,10.0.0.5"`."""
    nats_creds: Path | None = None
    """A NATS `.creds` file to connect with (a NATS given by `--nats-url` that needs one). Unset: the
    install's own NATS credentials (`<data dir>/nats-auth/`), or none for a NATS that takes anyone."""
    stream_max_bytes: int = Field(default=8 * 1024**3, ge=1024**2)
    """The event stream keeps at most this many bytes (oldest dropped; the stores stay the record)."""
    stream_max_age_s: float = Field(default=0.0, ge=0)
    """…and events at most this old (0: no age limit)."""
    max_viewers: int = Field(default=500, ge=1)
    """Live WebSocket viewers one gateway serves at once; one more is closed with 1013."""
    submit_rate_per_s: float = Field(default=5.0, gt=0)
    """Tasks one client may submit per second, sustained…"""
    submit_burst: int = Field(default=300, ge=1)
    """…and at once."""
    repo_schemes: Annotated[frozenset[str], NoDecode] = frozenset({"https", "ssh", "file"})
    """Repository URL schemes a task may use (`ssh` includes scp-style `user@host:path`)."""
    sandbox: str = Field(default="auto", pattern="^(auto|bwrap|none)$")
    """How agents are confined on the local provider: `bwrap` (required), `auto` (bwrap where it
    works, else none, said loudly), `none`."""
    vm_agent_credential_ttl_s: float = Field(default=24 * 3600.0, gt=0)
    """How long a vm_agent's token and NATS credential stay valid after its workspace is assigned."""
    watchdog_s: float = Field(default=10.0, ge=0)
    """`baton up` kills and restarts a service that pinged its watchdog and then fell silent
    this long (a stopped or stuck process keeps its store's relay lease); 0 turns it off."""

    # --- Providers (issue 14): where a task's workspace runs (docs/hetzner.md). ---
    provider: str = "local"
    """The provider of a task submitted without one (BATON_PROVIDER): `local` or `hetzner`."""
    hcloud_token: str | None = Field(default=None, repr=False)
    """The Hetzner Cloud API token (BATON_HCLOUD_TOKEN); never in an event, a log or user_data."""
    hcloud_endpoint: str = "https://api.hetzner.cloud/v1"
    """The Hetzner Cloud API's base URL (tests point it at a local fake)."""
    hcloud_server_type: str = "cx22"
    hcloud_image: str = "ubuntu-24.04"
    hcloud_locations: Annotated[tuple[str, ...], NoDecode] = ("fsn1", "nbg1", "hel1")
    """Tried in order: a location answering `resource_unavailable` passes to the next."""
    hcloud_reap_every_s: float = Field(default=300.0, gt=0)
    """How often the reaper deletes the install's servers that no live task owns."""
    vm_call_home_timeout_s: float = Field(default=600.0, gt=0)
    """A cloud server whose vm_agent has not called home this long after it was created is deleted."""
    vm_nats_url: str | None = None
    """The bus as cloud VMs reach it (BATON_VM_NATS_URL), e.g. `tls://nats.example.com:4222`."""
    vm_gateway_url: str | None = None
    """The gateway as cloud VMs reach it (BATON_VM_GATEWAY_URL, https): they fetch the vm_agent there."""

    # --- Pull requests (issue 15): a finished task opens a GitHub PR (README "Pull requests"). ---
    github_token: str | None = Field(default=None, repr=False)
    """A GitHub token for the API's host (BATON_GITHUB_TOKEN): pushes (as `x-access-token`, through
    git's credential helper) and opens PRs; never in a URL, an event or a log."""
    github_api_url: str = "https://api.github.com"
    """The GitHub REST API (BATON_GITHUB_API_URL); Enterprise: `https://HOST/api/v3`. Its host is
    the one the token is for; `http://` only for a host configured so (a local test server)."""
    github_webhook_secret: str | None = Field(default=None, repr=False)
    """Verifies `POST /api/hooks/github` (X-Hub-Signature-256); unset: the hook is off."""
    public_url: str | None = None
    """Where people open this Baton (BATON_PUBLIC_URL), for links in PRs; unset: http://host:port."""

    @field_validator("replica", mode="before")
    @classmethod
    def _parse_replica(cls, value: object) -> object:
        if isinstance(value, str):
            index, slash, count = value.partition("/")
            if not (slash and index.strip().isdigit() and count.strip().isdigit()):
                raise ValueError(f"expected INDEX/COUNT, e.g. 0/2 (the first of two replicas); got {value!r}")
            value = (int(index), int(count))
        if isinstance(value, (tuple, list)) and len(value) == 2 and not 0 <= value[0] < value[1]:
            raise ValueError(f"replica {value[0]}/{value[1]}: the index counts from 0 and is below the count")
        return value

    @field_validator("hcloud_locations", mode="before")
    @classmethod
    def _parse_locations(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    max_attempts: int = Field(default=3, ge=1)
    """Attempts a task gets when its workspace is lost mid-run (BATON_MAX_ATTEMPTS): the lost one
    is followed by a new one (AttemptStarted) until this many ran; then the task fails naming why."""
    max_running_tasks: int = Field(default_factory=lambda: default_max_running_tasks(), ge=1)
    """Tasks that hold a place (workspace and agent) at once; the rest wait `queued`, first come
    first served. Default: max(2, min(4 per CPU, 1 per GiB of free memory)). An agent's turn
    mostly waits on its model's API (a real agent's adapter is a Node process of a few hundred
    MB, plus the tools it runs), so memory bounds it before the CPUs do: 4 per CPU lets agents
    overlap their waiting, 1 GiB each keeps a full machine out of swap."""

    deadlines: str = ""
    """Override flow deadlines: `"PromptDelivered=30,AgentOutput=120"` (seconds, by awaited event)."""
    stall_after_s: float = Field(default=300.0, gt=0)
    """A running agent silent this long is reported as AgentStalled."""
    permission_timeout_s: float = Field(default=600.0, gt=0)
    """Under the `ask` policy, a permission request nobody answered this long is rejected."""
    linger_s: float = Field(default=300.0, ge=0)
    """After a task's turn is pushed, its workspace and agent session stay this long (BATON_LINGER_S)
    so a follow-up runs as the next turn of the same session; then the vm_agent exits."""
    overdue_backoff_s: Annotated[tuple[float, ...], NoDecode] = (1.0, 2.0, 4.0)
    """After StepOverdue the task runner retries (or waits) at these intervals, then fails the task."""

    # --- Notifications (issue 15): webhooks the notifier signs and posts (services/notifier). ---
    notify_webhooks: str | None = Field(default=None, repr=False)
    """The webhook endpoints as JSON (BATON_NOTIFY_WEBHOOKS): `[{"name", "url", "events", "format":
    "json"|"slack", "secret"}]`; unset: `<data dir>/notifications.json` if it exists. Holds secrets.
    Notifications link to the task's page under BATON_PUBLIC_URL (`public_url`, above)."""
    notify_max_attempts: int = Field(default=8, ge=1)
    """Attempts at one notification before it is given up (NotificationFailed)."""
    notify_backoff_s: float = Field(default=2.0, gt=0)
    """The wait after a notification's first failed attempt; doubled after each (capped at 10 min)."""

    @field_validator("warm_agents", mode="before")
    @classmethod
    def _parse_warm_agents(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [part.split("=", 1) for part in value.split(",") if part.strip()]
            if any(len(pair) != 2 for pair in pairs):
                raise ValueError(f"expected KIND=COUNT,…, e.g. shell=3,claude=1; got {value!r}")
            return {kind.strip(): int(count) for kind, count in pairs}
        return value

    @property
    def warm_mix(self) -> dict[str, int]:
        """How many vm_agents the warm pool keeps ready, by the kind of their warm agent."""
        return dict(self.warm_agents) if self.warm_agents else {"shell": self.warm_pool}

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

    @field_validator("allowed_hosts", "repo_schemes", mode="before")
    @classmethod
    def _parse_names(cls, value: object) -> object:
        if isinstance(value, str):
            return frozenset(part.strip().lower() for part in value.split(",") if part.strip())
        return value

    @field_validator("repo_schemes")
    @classmethod
    def _known_repo_schemes(cls, value: frozenset[str]) -> frozenset[str]:
        unknown = value - KNOWN_REPO_SCHEMES
        if unknown:  # `ext` and other remote helpers run programs: never allowed.
            raise ValueError(f"unknown repo scheme(s) {sorted(unknown)}; known: {sorted(KNOWN_REPO_SCHEMES)}")
        return value

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
        """A path under the data dir, its parent created (the data dir itself private: 0700)."""
        ensure_private_dir(self.data_dir)
        target = self.data_dir.joinpath(*parts)
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        return target

    @property
    def agents_root(self) -> Path:
        """BATON_AGENTS_DIR, else `<data dir>/agents` (not created)."""
        return self.agents_dir or self.data_dir / "agents"

    def install_secret(self) -> str:
        """The install's secret (vm_agent tokens derive from it); never logged, never in events,
        never outside the control plane."""
        return self.secret or read_or_create_secret(self.path("secret"))

    def api_token_value(self) -> str:
        """The API's bearer token: BATON_API_TOKEN, else `<data dir>/api-token` (created once, 0600)."""
        return self.api_token or read_or_create_secret(self.path("api-token"))


def nats_server_urls(url: str) -> list[str]:
    """The servers of a `nats_url`: `"nats://a:4222,nats://b:4222"` (a cluster; nats-py connects to
    any and fails over to the others) is two, one URL is one. Give the list to `nats.connect`,
    which reads a single string as one server."""
    servers = [part.strip() for part in url.split(",") if part.strip()]
    if not servers:
        raise ValueError("no NATS URL given (BATON_NATS_URL / --nats-url)")
    return servers


def secret_setting_names() -> frozenset[str]:
    """The variables of the settings that are secrets (never shown: `repr=False`), e.g.
    BATON_DATABASE_URL, BATON_HCLOUD_TOKEN: what no vm_agent's environment may carry."""
    prefix = Settings.model_config.get("env_prefix", "")
    return frozenset(f"{prefix}{name}".upper() for name, field in Settings.model_fields.items() if not field.repr)


def default_max_running_tasks() -> int:
    """max(2, min(4 per CPU, 1 per GiB of free memory)) on this machine."""
    cpus = os.cpu_count() or 1
    try:
        available_gib = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1024**3
    except (ValueError, OSError, AttributeError):
        available_gib = float(cpus * 4)
    return max(2, min(cpus * 4, int(available_gib)))


def ensure_private_dir(path: Path) -> None:
    """Create `path` (and parents) if needed and make it readable by its owner only."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        path.chmod(0o700)


def write_private(path: Path, text: str) -> Path:
    """Write `text` to `path` readable by its owner only (0600), replacing it atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    tmp.replace(path)
    return path


def read_or_create_secret(path: Path) -> str:
    """The secret in `path`, created atomically (0600) on first call: N processes starting at
    once all read the same non-empty value (one creates it, holding a lock on its directory; the
    others then read it). An empty file, left by an older Baton that crashed, is no secret: replaced."""
    value = _read_secret(path)
    if value:
        return value
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(directory, fcntl.LOCK_EX)  # Released when the descriptor closes.
        value = _read_secret(path)
        if value:
            return value  # Another process made it while this one waited.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secrets.token_hex(32).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)  # Whole or not at all.
    finally:
        os.close(directory)
    return path.read_text().strip()


def _read_secret(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        return ""
