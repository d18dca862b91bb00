"""The local provider: a git clone under the data dir and a vm_agent process next to it."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import subprocess
from pathlib import Path

from services.provisioner.vm_agents import VmAgentError, VmAgentPool, VmAgentProcess, answers
from services.runtime.settings import Settings

log = logging.getLogger(__name__)


class ProvisionError(Exception):
    """No workspace could be made; str() is the reason users see."""


class LocalProvider:
    name = "local"

    def __init__(self, settings: Settings, *, ready_timeout_s: float = 60.0) -> None:
        self._settings = settings
        self.pool = VmAgentPool(settings, size=settings.warm_pool, ready_timeout_s=ready_timeout_s)

    def workspace_dir(self, task_id: str) -> Path:
        return self._settings.data_dir / "workspaces" / task_id

    def vm_agent_dir(self, task_id: str) -> Path:
        return self._settings.data_dir / "vm_agents" / task_id

    async def clone(self, task_id: str, repo: str, base_branch: str | None) -> Path:
        """Clone `repo` (at `base_branch`) into the task's workspace, replacing a partial one."""
        target = self.workspace_dir(task_id)
        if target.exists():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        branch = ["--branch", base_branch] if base_branch else []
        process = await asyncio.create_subprocess_exec(
            "git", "clone", "--quiet", *branch, "--", repo, str(target),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "GIT_TERMINAL_PROMPT": "0"},
        )
        _, stderr = await process.communicate()
        if process.returncode != 0:
            raise ProvisionError(f"git clone {repo} failed: {stderr.decode(errors='replace').strip()}")
        return target

    async def provision(self, task_id: str, repo: str, base_branch: str | None, *, agent: str) -> str:
        """Clone the workspace and assign it a warm vm_agent (both at once); the vm_agent's URL.

        If the task already has its vm_agent (a provisioner restarted after assigning it),
        that one's URL: the clone was done before it was assigned.
        """
        state_dir = self.vm_agent_dir(task_id)
        url_file = state_dir / "url"
        if url_file.exists() and await answers(url_file.read_text().strip(), task_id=task_id):
            return url_file.read_text().strip()
        loop = asyncio.get_running_loop()
        started, ready_before = loop.time(), self.pool.ready_count
        workspace = self.workspace_dir(task_id)
        # The vm_agent does not touch the workspace before a session starts: it is taken and
        # assigned while the clone runs.
        assigning = loop.create_task(self._take_and_assign(task_id, workspace, state_dir, agent))
        try:
            await self.clone(task_id, repo, base_branch)
            cloned = loop.time()
            member, taken = await assigning
        except VmAgentError as error:
            raise ProvisionError(str(error)) from error
        except BaseException:  # The clone failed (or we are stopping): that vm_agent is not needed.
            assigning.cancel()
            assigning.add_done_callback(_kill_assigned)
            raise
        log.info("workspace of %s ready in %.0f ms: clone %.0f ms, vm_agent taken after %.0f ms "
                 "(%d warm before), assigned %.0f ms later", task_id, 1000 * (loop.time() - started),
                 1000 * (cloned - started), 1000 * (taken - started), ready_before,
                 1000 * (loop.time() - taken))
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "pid").write_text(str(member.pid))
        # From now on it is the task's: a restarted provisioner's pool reset must not stop it.
        (member.state_dir / "pid").unlink(missing_ok=True)
        url_file.write_text(member.url)
        log_link = state_dir / "vm_agent.log"
        if not log_link.exists():
            log_link.symlink_to(member.state_dir / "vm_agent.log")
        return member.url

    async def _take_and_assign(
        self, task_id: str, workspace: Path, state_dir: Path, agent: str
    ) -> tuple[VmAgentProcess, float]:
        member = await self.pool.take(agent)
        taken = asyncio.get_running_loop().time()
        try:
            await self.pool.assign(member, task_id=task_id, workspace=workspace, state_dir=state_dir)
        except BaseException:
            member.kill()
            raise
        return member, taken


def _kill_assigned(assigning: asyncio.Task[tuple[VmAgentProcess, float]]) -> None:
    if not assigning.cancelled() and assigning.exception() is None:
        assigning.result()[0].kill()
