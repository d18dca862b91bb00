"""Local vm_agent processes: started ahead of time (a warm pool), assigned to a task on demand.

A vm_agent (and the agent it warms) takes about a second to start, mostly Python imports; a
warm pool takes that off the task's path. With the pool empty, one is started on demand.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from services.runtime.settings import Settings
from services.runtime.tokens import vm_agent_token

log = logging.getLogger(__name__)


class VmAgentError(Exception):
    """No vm_agent could be had; str() is the reason users see."""


@dataclass
class VmAgentProcess:
    url: str
    process: subprocess.Popen
    state_dir: Path
    warm_agent: str | None

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        if self.alive:
            os.killpg(self.process.pid, signal.SIGTERM)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


_http: httpx.AsyncClient | None = None


def http() -> httpx.AsyncClient:
    """One client for every probe and call (each new client builds a TLS context: costly)."""
    global _http
    if _http is None:
        _http = httpx.AsyncClient(timeout=10.0)
    return _http


async def answers(url: str, *, task_id: str | None = None) -> bool:
    """The vm_agent at `url` is up (and, if `task_id` is given, serves that task)."""
    try:
        response = await http().get(f"{url}/health", timeout=2.0)
    except httpx.HTTPError:
        return False
    return response.status_code == 200 and (task_id is None or response.json().get("task_id") == task_id)


class VmAgentPool:
    def __init__(self, settings: Settings, *, size: int, ready_timeout_s: float = 60.0) -> None:
        self._settings = settings
        self._size = size
        self._ready_timeout_s = ready_timeout_s
        self._ready: list[VmAgentProcess] = []
        self._numbers = itertools.count(1)
        self._filling: asyncio.Task[None] | None = None
        # Python start-ups compete for the CPUs: a few at a time finish sooner than all at once.
        self._starting = asyncio.Semaphore(max(2, os.cpu_count() or 2))
        self.pool_dir = settings.data_dir / "vm_agents" / "pool"

    def reset(self) -> None:
        """Stop idle vm_agents a previous provisioner left behind; they are not ours to assign."""
        for pid_file in self.pool_dir.glob("*/pid"):
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError, PermissionError):
                pass
        shutil.rmtree(self.pool_dir, ignore_errors=True)

    def refill_soon(self) -> None:
        if self._size and (self._filling is None or self._filling.done()):
            self._filling = asyncio.get_running_loop().create_task(self._fill())

    async def _fill(self) -> None:
        missing = self._size - len(self._ready)
        started = await asyncio.gather(
            *(self.spawn(self.pool_dir / str(next(self._numbers)), warm_agent="shell") for _ in range(missing)),
            return_exceptions=True,
        )
        for member in started:
            if isinstance(member, VmAgentProcess):
                self._ready.append(member)
            else:
                log.warning("could not warm a vm_agent: %s", member)

    async def take(self, agent: str) -> VmAgentProcess:
        """A running, unassigned vm_agent: a warm one (with `agent` warm if possible), else a new one."""
        self._ready = [member for member in self._ready if member.alive]
        match = next((m for m in self._ready if m.warm_agent == agent), None) or next(iter(self._ready), None)
        if match is not None:
            self._ready.remove(match)
            self.refill_soon()
            return match
        self.refill_soon()
        return await self.spawn(self.pool_dir / str(next(self._numbers)), warm_agent=agent)

    async def spawn(self, state_dir: Path, *, warm_agent: str | None) -> VmAgentProcess:
        async with self._starting:  # The readiness timeout counts from the real start.
            return await self._spawn(state_dir, warm_agent=warm_agent)

    async def _spawn(self, state_dir: Path, *, warm_agent: str | None) -> VmAgentProcess:
        state_dir.mkdir(parents=True, exist_ok=True)
        log_file = state_dir / "vm_agent.log"
        settings = self._settings
        env = {
            **os.environ,
            "BATON_NATS_URL": settings.nats_url,
            "BATON_FAULTS": ",".join(sorted(settings.faults)),
            "BATON_VM_AGENT_TOKEN": self.pool_token(state_dir),
        }
        env.pop("BATON_SECRET", None)  # A vm_agent gets tokens, never the install secret.
        argv = [sys.executable, "-m", "vm_agent", "--state-dir", str(state_dir),
                "--host", settings.vm_agent_bind,
                "--advertise-host", settings.vm_agent_advertise or settings.vm_agent_bind]
        if warm_agent:
            argv += ["--warm-agent", warm_agent]
        with log_file.open("ab") as log_handle:
            process = subprocess.Popen(argv, stdout=log_handle, stderr=log_handle,
                                       stdin=subprocess.DEVNULL, env=env,
                                       start_new_session=True)  # Outlives a provisioner restart.
        (state_dir / "pid").write_text(str(process.pid))
        url = await self._wait_until_answering(process, state_dir / "url", log_file)
        return VmAgentProcess(url, process, state_dir, warm_agent)

    def pool_token(self, state_dir: Path) -> str:
        return vm_agent_token(self._settings.install_secret(), f"pool/{state_dir.name}")

    async def _wait_until_answering(self, process: subprocess.Popen, url_file: Path, log_file: Path) -> str:
        deadline = asyncio.get_running_loop().time() + self._ready_timeout_s
        while asyncio.get_running_loop().time() < deadline:
            if process.poll() is not None:
                raise VmAgentError(f"vm_agent exited with code {process.returncode}: {_tail(log_file)}")
            if url_file.exists() and await answers(url_file.read_text().strip()):
                return url_file.read_text().strip()
            await asyncio.sleep(0.05)
        process.kill()
        raise VmAgentError(f"vm_agent did not answer within {self._ready_timeout_s:.0f}s")

    async def assign(self, member: VmAgentProcess, *, task_id: str, workspace: Path, state_dir: Path) -> None:
        """Hand the vm_agent its task; from then on it answers only to the task's token."""
        body = {"task_id": task_id, "workspace": str(workspace), "state_dir": str(state_dir),
                "token": vm_agent_token(self._settings.install_secret(), task_id)}
        headers = {"Authorization": f"Bearer {self.pool_token(member.state_dir)}"}
        try:
            response = await http().post(f"{member.url}/assign", json=body, headers=headers)
        except httpx.HTTPError as error:
            member.kill()
            raise VmAgentError(f"vm_agent at {member.url} could not be assigned: {error!r}") from error
        if response.status_code != 200:
            member.kill()
            raise VmAgentError(f"vm_agent refused the assignment ({response.status_code}): {response.text[:300]}")

    def stop_idle(self) -> None:
        for member in self._ready:
            member.kill()
        self._ready.clear()
