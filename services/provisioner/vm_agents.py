"""Local vm_agent processes: started ahead of time (a warm pool), assigned to a task on demand.

Starting a vm_agent costs most of a second of CPU in Python imports, and its agent as much
again. Two things take that off a task's path: a **zygote** (`vm_agent/zygote.py`), a template
process that imported everything once and forks a new vm_agent in milliseconds, and a **warm
pool** of vm_agents whose agent is already started and initialized. A task takes a pool member
that is fully warm; with none left it waits for the next one to become ready (refills start at
once, a few at a time so they do not fight over the CPUs).

Each member is a process the provisioner reaches over the bus only (members.py: `VmAgentProcess`,
`MemberBus`, `Zygote`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

from services.provisioner.members import (
    MemberBus, VmAgentError, VmAgentProcess, Zygote, kill_group, log_tail, process_alive,
)
from services.runtime.agent_secrets import agent_environ
from services.runtime.nats_auth import vm_agent_credentials, vm_member_credentials
from services.runtime.repo_url import RepoCredential
from services.runtime.settings import Settings, secret_setting_names
from services.runtime.vm_agent_commands import Assignment, Hello, RepoCredentialBody
from vm_agent.backends import available_backends
from vm_agent.sandbox import Sandbox

log = logging.getLogger(__name__)


class BurstMemory:
    """How many members of each kind a recent burst took: the most takes within any BURST_S of
    the last REMEMBER_S. The pool keeps that many ready, so the next burst finds them warm
    rather than waiting for each to start (a member's start is most of a second of CPU)."""

    BURST_S = 5.0
    REMEMBER_S = 600.0

    def __init__(self) -> None:
        self._takes: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)

    def took(self, kind: str, now: float) -> None:
        takes = self._takes[kind]
        takes.append(now)
        while takes and takes[0] < now - self.REMEMBER_S:
            takes.popleft()

    def kinds(self) -> list[str]:
        return list(self._takes)

    def peak(self, kind: str, now: float) -> int:
        times = [t for t in self._takes.get(kind, ()) if t >= now - self.REMEMBER_S]
        peak, first = 0, 0
        for last, when in enumerate(times):
            while when - times[first] > self.BURST_S:
                first += 1
            peak = max(peak, last - first + 1)
        return peak


class VmAgentPool:
    def __init__(self, settings: Settings, *, mix: Mapping[str, int], ready_timeout_s: float = 60.0) -> None:
        self._settings = settings
        self._mix = Counter({kind: count for kind, count in mix.items() if count > 0})
        """How many members to keep ready at least, by the kind of agent each keeps warm."""
        self._size = sum(self._mix.values())
        self._max_size = max(self._size, settings.warm_pool_max)
        self._bursts = BurstMemory()
        self._trim_later: asyncio.TimerHandle | None = None
        self._ready_timeout_s = ready_timeout_s
        self._ready: list[VmAgentProcess] = []
        self._numbers = itertools.count(1)
        self._starting = 0
        self._starting_kinds: Counter[str] = Counter()
        self._waiting: list[str] = []  # The agent each waiting `take` asked for.
        self._changed: asyncio.Condition | None = None
        self._failure: str | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Agent start-ups compete for the CPUs: a few at a time finish sooner than all at once.
        self._start_slots = asyncio.Semaphore(max(2, os.cpu_count() or 2))
        self._credentials_key = secrets.token_bytes(32)
        # Each replica's pool apart (a data dir shared by replicas): `reset` stops only its own.
        own = "" if settings.replica[1] == 1 else f"-{settings.replica[0]}"
        self.pool_dir = settings.data_dir / "vm_agents" / f"pool{own}"
        # Beside the workspaces (one file system): a clone moves into one by renames.
        self.pool_workspaces = settings.data_dir / "workspaces" / f".pool{own}"
        self.sandbox = Sandbox.from_setting(settings.sandbox, hidden=(settings.data_dir,))
        self.zygote = Zygote(settings.path("logs", f"vm_agent-zygote{own}.log"), ready_timeout_s=ready_timeout_s)
        # Reaching the bus counts within a member's readiness deadline (never longer than 30 s).
        self.members = MemberBus(settings, connect_timeout_s=min(30.0, ready_timeout_s))

    def reset(self) -> None:
        """Stop idle vm_agents a previous provisioner left behind; they are not ours to assign."""
        for pid_file in self.pool_dir.glob("*/pid"):
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)
            except (ProcessLookupError, ValueError, PermissionError):
                pass
        shutil.rmtree(self.pool_dir, ignore_errors=True)
        shutil.rmtree(self.pool_workspaces, ignore_errors=True)

    @property
    def ready_count(self) -> int:
        return len(self._ready)

    def status(self) -> dict[str, int | str]:
        """For `/api/health`: how warm the pool is, and how its agents are sandboxed."""
        return {"warm_vm_agents": len(self._ready), "warm_pool_size": sum(self._wanted().values()),
                "warm_pool_min": self._size, "warm_pool_max": self._max_size,
                "warm_agents": dict(self._mix),
                "vm_agents_starting": self._starting, "tasks_waiting_for_a_vm_agent": len(self._waiting),
                "sandbox": self.sandbox.describe()}

    def refill_soon(self) -> None:
        """Start as many vm_agents as the pool and the waiting takers are short of, by kind."""
        for agent in self._shortfall():
            self._starting += 1
            self._starting_kinds[agent] += 1
            task = asyncio.get_running_loop().create_task(self._start_member(agent))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _shortfall(self) -> list[str]:
        """The kinds to warm now: the pool's mix and one per waiting take, less the members ready
        or starting of each kind. A kind that cannot run here (not installed, no credentials) is
        not warmed: a take waiting for it is served by a shell member."""
        ready_kinds = available_backends(self._settings.agents_root, agent_environ(self._settings))
        wanted = Counter({kind: n for kind, n in self._wanted().items() if kind in ready_kinds})
        wanted.update(kind if kind in ready_kinds else "shell" for kind in self._waiting)
        have = Counter(member.warm_agent for member in self._ready) + self._starting_kinds
        return list((wanted - have).elements())

    def _wanted(self) -> Counter[str]:
        """How many to keep ready, by kind: the mix, raised to the last bursts' takes (at most
        `warm_pool_max` in all; the mix's kinds first, then the kinds that burst the most) while
        members start."""
        now = time.monotonic()
        wanted = Counter(self._mix)
        if self._failure is not None:
            return wanted  # Members fail to start: the pool does not grow (a take says why).
        peaks = {kind: self._bursts.peak(kind, now) for kind in (*self._mix, *self._bursts.kinds())}
        room = self._max_size - self._size
        for kind, peak in sorted(peaks.items(), key=lambda item: -item[1]):
            extra = min(max(0, peak - wanted[kind]), room)
            wanted[kind] += extra
            room -= extra
        return +wanted

    def _trim(self) -> None:
        """Stop the ready members beyond what is wanted now (a burst forgotten)."""
        surplus = Counter(member.warm_agent for member in self._ready) - self._wanted()
        for member in list(reversed(self._ready)):
            if surplus[member.warm_agent] > 0:
                surplus[member.warm_agent] -= 1
                self._ready.remove(member)
                member.kill()

    async def _start_member(self, agent: str) -> None:
        loop = asyncio.get_running_loop()
        asked = loop.time()
        try:
            member = await self.spawn(self.pool_dir / str(next(self._numbers)), warm_agent=agent)
        except (VmAgentError, OSError) as error:
            log.warning("could not start a vm_agent: %s", error)
            self._failure = str(error)
        else:
            self._ready.append(member)
            self._failure = None
            log.info("vm_agent %s warm (%s) in %.0f ms; %d ready, %d starting, %d tasks waiting", member.vm_id,
                     agent, 1000 * (loop.time() - asked), len(self._ready), self._starting - 1, len(self._waiting))
        finally:
            self._starting -= 1
            self._starting_kinds[agent] -= 1
        await self._notify()

    async def _notify(self) -> None:
        changed = self._condition()
        async with changed:
            changed.notify_all()

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def take(self, agent: str) -> VmAgentProcess:
        """A warm, unassigned vm_agent (one warm with `agent` if there is), waiting for the next
        one to be ready if none is; raises VmAgentError if none could be started."""
        self._waiting.append(agent)
        self._remember_take(agent)
        changed = self._condition()
        try:
            async with changed:  # Checked under the lock: a member made ready meanwhile is seen.
                asked = False
                while True:
                    self._ready = self._fresh_members()
                    if self._ready:
                        match = next((m for m in self._ready if m.warm_agent == agent), self._ready[0])
                        self._ready.remove(match)
                        return match
                    if asked and self._starting == 0 and self._failure is not None:
                        raise VmAgentError(self._failure)
                    self.refill_soon()
                    asked = True
                    await changed.wait()
        finally:
            self._waiting.remove(agent)
            self.refill_soon()

    def _remember_take(self, agent: str) -> None:
        """Count the take towards the pool's size, and trim the pool once the burst is forgotten."""
        self._bursts.took(agent, time.monotonic())
        if self._trim_later is not None:
            self._trim_later.cancel()
        self._trim_later = asyncio.get_running_loop().call_later(BurstMemory.REMEMBER_S + 1, self._trim)

    def put_back(self, member: VmAgentProcess) -> None:
        """A member taken but never assigned (its task's clone failed) is still fresh."""
        if member.alive:
            self._ready.insert(0, member)
            asyncio.get_running_loop().create_task(self._notify())

    async def spawn(self, state_dir: Path, *, warm_agent: str | None) -> VmAgentProcess:
        async with self._start_slots:  # The readiness timeout counts from the real start.
            return await self._spawn(state_dir, warm_agent=warm_agent)

    async def _spawn(self, state_dir: Path, *, warm_agent: str | None) -> VmAgentProcess:
        state_dir.mkdir(parents=True, exist_ok=True)
        log_file = state_dir / "vm_agent.log"
        settings = self._settings
        credentials = agent_environ(settings)
        vm_id = f"local-{state_dir.name}-{secrets.token_hex(4)}"
        member_expires_at = time.time() + settings.vm_agent_credential_ttl_s
        env = {
            **os.environ,
            **credentials,  # Its agents' credentials (each agent gets only its own kind's).
            "BATON_NATS_URL": settings.nats_url,
            "BATON_FAULTS": ",".join(sorted(settings.faults)),
            "BATON_VM_ID": vm_id,
            "BATON_DATA_DIR": os.path.abspath(settings.data_dir),  # What its agent must not see.
            "BATON_SANDBOX": settings.sandbox,
        }
        member_credentials = vm_member_credentials(settings, vm_id)
        if member_credentials is not None:
            env["BATON_VM_AGENT_CREDS"] = member_credentials
        # A vm_agent gets its own credentials, never the install's secrets (the install secret, the
        # database's password, the cloud and GitHub tokens, …).
        for name in secret_setting_names() | {"BATON_VM_AGENT_TOKEN"}:
            env.pop(name, None)
        argv = ["--state-dir", str(state_dir), "--follow-up-linger-s", str(settings.linger_s)]
        workspace = self.pool_workspaces / state_dir.name
        workspace.mkdir(mode=0o700, parents=True, exist_ok=True)
        argv += ["--workspace", str(workspace)]
        if warm_agent:
            argv += ["--warm-agent", warm_agent]
        await self.members.connected()  # Before it starts: its hello cannot be missed.
        hello = self.members.expect_hello(vm_id)
        if await self.zygote.ready():
            pid = await self.zygote.fork(argv, env=env, log_path=log_file)
        else:
            with log_file.open("ab") as log_handle:
                pid = subprocess.Popen(
                    [sys.executable, "-m", "vm_agent", *argv], stdout=log_handle, stderr=log_handle,
                    stdin=subprocess.DEVNULL, env=env,
                    start_new_session=True,  # Outlives a provisioner restart.
                ).pid
        (state_dir / "pid").write_text(str(pid))
        try:
            said = await self._wait_for_hello(pid, hello, log_file)
        except BaseException:  # Timed out, or cancelled (the provisioner stops): not left running.
            self.members.forget(vm_id)
            kill_group(pid, signal.SIGTERM)
            raise
        return VmAgentProcess(vm_id, pid, state_dir, warm_agent, workspace, self._credentials_version(credentials),
                              member_expires_at, said)

    def _credentials_version(self, credentials: Mapping[str, str]) -> str:
        text = json.dumps(sorted(credentials.items()))
        return hmac.new(self._credentials_key, text.encode(), hashlib.sha256).hexdigest()

    def _fresh_members(self) -> list[VmAgentProcess]:
        """The ready members still running with the agents' credentials as they are now; those
        started with older ones (a secret set or unset since) are stopped."""
        current = self._credentials_version(agent_environ(self._settings))
        # Time to be assigned before its member credential expires (it stops then).
        usable_until = time.time() + min(60.0, self._settings.vm_agent_credential_ttl_s / 2)
        fresh = []
        for member in self._ready:
            if member.alive and member.credentials_version == current and member.member_expires_at > usable_until:
                fresh.append(member)
            elif member.alive:
                member.kill()
        return fresh

    async def _wait_for_hello(self, pid: int, hello: asyncio.Future[Hello], log_file: Path) -> Hello:
        """Wait for the vm_agent's hello (sent once its warm agent, if any, is started or failed);
        raises VmAgentError at once if it exits first, or at the readiness deadline."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ready_timeout_s
        while loop.time() < deadline:
            if not process_alive(pid):
                raise VmAgentError(f"vm_agent exited during start-up: {log_tail(log_file)}")
            done, _ = await asyncio.wait([hello], timeout=min(0.2, max(0.0, deadline - loop.time())))
            if done:
                return hello.result()
        raise VmAgentError(f"vm_agent did not say hello on the bus within {self._ready_timeout_s:.0f}s")

    async def assign(
        self, member: VmAgentProcess, *, task_id: str, workspace: Path, state_dir: Path,
        repo_credential: RepoCredential | None = None,
    ) -> None:
        """Hand the vm_agent its task, over the bus: from then on it answers only its task's
        commands, with its task's own credential. It keeps `repo_credential` in memory only, to push."""
        # The bus credential is the workspace's own and expires; it travels in a core NATS
        # request to this member alone, never in an event or a log.
        expires_at = int(time.time() + self._settings.vm_agent_credential_ttl_s)
        assignment = Assignment(
            task_id=task_id, workspace=workspace, state_dir=state_dir, credential_expires_at=expires_at,
            nats_credentials=vm_agent_credentials(self._settings, task_id),
            repo_credential=None if repo_credential is None else RepoCredentialBody(**asdict(repo_credential)))
        try:
            reply = await self.members.assign(member.vm_id, assignment)
        except BaseException:
            member.kill()
            raise
        if not reply.accepted:
            member.kill()
            raise VmAgentError(f"vm_agent refused the assignment ({reply.status}): {reply.reason[:300]}")
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "credential_expires_at").write_text(str(expires_at))

    def stop_idle(self) -> None:
        """Stop the unassigned vm_agents and the zygote (assigned ones finish their task)."""
        for task in self._background:
            task.cancel()
        if self._trim_later is not None:
            self._trim_later.cancel()
        for member in self._ready:
            member.kill()
        self._ready.clear()
        self.zygote.stop()
        with contextlib.suppress(RuntimeError):  # No loop: the process is ending anyway.
            asyncio.get_running_loop().create_task(self.members.close())
