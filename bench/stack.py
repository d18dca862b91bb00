"""The system under test: a hermetic nats-server and `baton up`, plus what watches them.

The processes are the test suite's own (`tests/support/processes.py`), so the benchmark runs
Baton exactly the way the capability tests do: real processes, loopback only, stopped in `finally`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench import procfs
from tests.support.git_remote import make_origin
from tests.support.processes import BatonStack, NatsServer

TERMINAL = ("TaskCompleted", "TaskFailed")


def log(message: str) -> None:
    """Progress goes to stderr: stdout is the table and the final JSON line."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Stack:
    """nats-server + `baton up` + a bare origin repo, all under `root`."""

    root: Path
    nats: NatsServer | None = None
    baton: BatonStack | None = None
    origin: Path | None = None
    swept: int = 0
    still_running: int = 0
    replicas: int = 1
    """`baton up --replicas`: processes of each service."""

    def start(self) -> Stack:
        self.origin = make_origin(self.root)
        self.nats = NatsServer(store_dir=self.root / "nats").start()
        self.baton = BatonStack(nats=self.nats, data_dir=self.root / "baton", replicas=self.replicas)
        self.baton.start()
        return self

    @property
    def api(self) -> str:
        assert self.baton is not None
        return self.baton.api

    @property
    def ws(self) -> str:
        return self.api.replace("http://", "ws://")

    @property
    def auth(self) -> dict[str, str]:
        """The API token's header, for every HTTP request and WebSocket to the stack."""
        assert self.baton is not None
        return self.baton.auth

    @property
    def data_dir(self) -> Path:
        return self.root / "baton"

    def pid(self, service: str) -> int | None:
        """The service's process (with replicas: replica 0's)."""
        name = service if self.replicas == 1 else f"{service}-0"
        try:
            return int((self.data_dir / "run" / f"{name}.pid").read_text())
        except (OSError, ValueError):
            return None

    def vm_agent_pid(self, task_id: str) -> int | None:
        try:
            return int((self.data_dir / "vm_agents" / task_id / "pid").read_text())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Stop `baton up` (which stops its services and vm_agents), then NATS; then sweep.

        `baton up` may not get to stop every vm_agent (it is SIGKILLed if it takes over 30 s),
        and vm_agents and agents run in sessions of their own: whatever is left that this run
        started — every process whose environment has this run's BATON_DATA_DIR — is ended by
        its pid, SIGTERM first, then SIGKILL.
        """
        if self.baton is not None:
            with contextlib.suppress(Exception):
                self.baton.stop()
        if self.nats is not None:
            with contextlib.suppress(Exception):
                self.nats.stop()
        leftovers = started_by_this_run(self.data_dir)
        self.swept = len(leftovers)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in leftovers:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 5
            while leftovers and time.monotonic() < deadline:
                time.sleep(0.1)
                leftovers = [pid for pid in leftovers if procfs.alive(pid)]
        self.still_running = len(started_by_this_run(self.data_dir))


def started_by_this_run(data_dir: Path) -> list[int]:
    """Live processes whose environment carries BATON_DATA_DIR=<this run's data dir>."""
    marker = f"BATON_DATA_DIR={data_dir}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0") and procfs.alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def rss_mb(pid: int) -> float | None:
    """VmRSS of a process in MB (from /proc/<pid>/status), or None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("inf")


class RssSampler:
    """Samples the gateway's VmRSS every `every_s` in a thread; peaks are kept per phase label."""

    def __init__(self, stack: Stack, *, every_s: float = 0.1) -> None:
        self._stack = stack
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.phase = "idle"
        self.peak: dict[str, float] = defaultdict(float)
        self.samples: dict[str, int] = defaultdict(int)
        self.min_mem_available_mb = float("inf")
        self.gateway_restarts = 0
        self._last_pid: int | None = None

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            pid = self._stack.pid("gateway")
            if pid and pid != self._last_pid:
                if self._last_pid is not None:
                    self.gateway_restarts += 1
                self._last_pid = pid
            value = rss_mb(pid) if pid else None
            self.min_mem_available_mb = min(self.min_mem_available_mb, mem_available_mb())
            if value is not None:
                self.peak[self.phase] = max(self.peak[self.phase], value)
                self.samples[self.phase] += 1

    @property
    def overall_peak(self) -> float:
        return max(self.peak.values(), default=0.0)


@dataclass
class TaskSeen:
    """What the board feed showed of one task: each event type's envelope and local receipt time."""

    events: dict[str, dict[str, Any]] = field(default_factory=dict)
    received_at: dict[str, float] = field(default_factory=dict)  # time.time() at receipt
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def terminal(self) -> str | None:
        return next((t for t in TERMINAL if t in self.events), None)


class BoardFeed:
    """One WebSocket on `/api/stream?exclude=AgentOutput` from a given sequence: every task's handoffs.

    If the connection drops it resumes from the last stream_seq + 1, the way the README tells
    clients to (bounded: `max_reconnects`); each drop is kept in `drops`, for the report.
    """

    def __init__(self, stack: Stack, from_seq: int, *, max_reconnects: int = 20) -> None:
        self._base = f"{stack.ws}/api/stream"
        self._auth = stack.auth
        self._next_seq = from_seq
        self._max_reconnects = max_reconnects
        self.tasks: dict[str, TaskSeen] = defaultdict(TaskSeen)
        self._task: asyncio.Task[None] | None = None
        self.error: BaseException | None = None
        self.drops: list[str] = []
        self.ready = asyncio.Event()

    async def __aenter__(self) -> BoardFeed:  # noqa: PYI034
        self._task = asyncio.create_task(self._follow())
        await asyncio.wait_for(self.ready.wait(), 10)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _follow(self) -> None:
        import websockets

        for attempt in range(self._max_reconnects + 1):
            url = f"{self._base}?from_seq={self._next_seq}&exclude=AgentOutput"
            try:
                async with websockets.connect(url, max_size=None, open_timeout=10,
                                              additional_headers=self._auth) as socket:
                    self.ready.set()
                    async for raw in socket:
                        now = time.time()
                        event = json.loads(raw)
                        self._next_seq = event["stream_seq"] + 1
                        seen = self.tasks[event["task_id"]]
                        seen.events.setdefault(event["type"], event)
                        seen.received_at.setdefault(event["type"], now)
                        seen.changed.set()
                    self.drops.append(f"closed by the gateway: {socket.close_code} {socket.close_reason}")
            except asyncio.CancelledError:
                raise
            except Exception as error:  # noqa: BLE001 - any drop is resumed and reported.
                self.drops.append(f"{type(error).__name__}: {error}"[:200])
            if attempt < self._max_reconnects:
                await asyncio.sleep(0.5)
        self.error = RuntimeError(f"board feed dropped {len(self.drops)} times: {self.drops[-3:]}")
        self.ready.set()
        for seen in self.tasks.values():
            seen.changed.set()

    async def wait_for(self, task_id: str, types: tuple[str, ...], *, timeout_s: float) -> TaskSeen | None:
        """The task once any of `types` was seen, or None at the deadline (or if the feed broke)."""
        seen = self.tasks[task_id]
        deadline = time.monotonic() + timeout_s
        while not any(t in seen.events for t in types):
            if self.error is not None:
                return None
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            seen.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(seen.changed.wait(), min(left, 1.0))
        return seen


async def stream_last_seq(nats_url: str) -> int:
    import nats

    nc = await nats.connect(nats_url)
    try:
        return (await nc.jetstream().stream_info("BATON_EVENTS")).state.last_seq
    finally:
        await nc.close()


async def wait_until_pool_warm(stack: Stack, *, timeout_s: float) -> bool:
    """Wait (bounded) until the provisioner reports its warm vm_agent pool full (`/api/health`):
    a benchmark measures a running Baton, not one still warming up after `baton up`."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=5, headers=stack.auth) as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError):
                pool = (await client.get(f"{stack.api}/api/health")).json().get("details", {}).get("provisioner")
                if pool and pool["warm_vm_agents"] >= pool["warm_pool_size"]:
                    return True
            await asyncio.sleep(0.2)
    return False


async def wait_until_consumers_idle(nats_url: str, *, timeout_s: float) -> dict[str, int]:
    """Wait (bounded) until every durable consumer of BATON_EVENTS has read and acked everything.

    Between benchmarks, so that one benchmark's backlog (the projector's and the monitor's work
    on the last task's events) does not run during the next one. Returns what is still pending.
    """
    import nats

    nc = await nats.connect(nats_url, name="bench-settle")
    try:
        js = nc.jetstream()
        deadline = time.monotonic() + timeout_s
        while True:
            pending = {
                info.name: info.num_pending + info.num_ack_pending
                for info in await js.consumers_info("BATON_EVENTS")
                if info.config.durable_name
            }
            busy = {name: n for name, n in pending.items() if n}
            if not busy or time.monotonic() > deadline:
                return busy
            await asyncio.sleep(0.25)
    finally:
        await nc.close()
