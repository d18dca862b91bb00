"""The local provider: a git clone under the data dir and a vm_agent process next to it."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx

from services.runtime.settings import Settings
from services.runtime.tokens import vm_agent_token


class ProvisionError(Exception):
    """No workspace could be made; str() is the reason users see."""


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class LocalProvider:
    name = "local"

    def __init__(self, settings: Settings, *, ready_timeout_s: float = 60.0) -> None:
        self._settings = settings
        self._ready_timeout_s = ready_timeout_s

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

    async def start_vm_agent(self, task_id: str, workspace: Path) -> str:
        """Start the workspace's vm_agent (or find the one already running); returns its URL."""
        state_dir = self.vm_agent_dir(task_id)
        url_file = state_dir / "url"
        if url_file.exists() and await self._answers(url_file.read_text().strip()):
            return url_file.read_text().strip()
        state_dir.mkdir(parents=True, exist_ok=True)
        url_file.unlink(missing_ok=True)
        log_file = state_dir / "vm_agent.log"
        env = {
            **os.environ,
            "BATON_NATS_URL": self._settings.nats_url,
            "BATON_FAULTS": ",".join(sorted(self._settings.faults)),
            "BATON_VM_AGENT_TOKEN": vm_agent_token(self._settings.install_secret(), task_id),
        }
        env.pop("BATON_SECRET", None)  # The vm_agent gets its own token, never the install secret.
        with log_file.open("ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "vm_agent", "--task-id", task_id,
                 "--workspace", str(workspace), "--state-dir", str(state_dir),
                 "--host", self._settings.vm_agent_bind,
                 "--advertise-host", self._settings.vm_agent_advertise or self._settings.vm_agent_bind],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True,  # Outlives a provisioner restart.
            )
        (state_dir / "pid").write_text(str(process.pid))
        return await self._wait_until_answering(process, url_file, log_file)

    async def _wait_until_answering(
        self, process: subprocess.Popen, url_file: Path, log_file: Path
    ) -> str:
        deadline = asyncio.get_running_loop().time() + self._ready_timeout_s
        while asyncio.get_running_loop().time() < deadline:
            if process.poll() is not None:
                raise ProvisionError(
                    f"vm_agent exited with code {process.returncode}: {_tail(log_file)}"
                )
            if url_file.exists() and await self._answers(url_file.read_text().strip()):
                return url_file.read_text().strip()
            await asyncio.sleep(0.05)
        process.kill()
        raise ProvisionError(f"vm_agent did not answer within {self._ready_timeout_s:.0f}s")

    @staticmethod
    async def _answers(url: str) -> bool:
        try:
            async with httpx.AsyncClient(timeout=2.0) as client:
                return (await client.get(f"{url}/health")).status_code == 200
        except httpx.HTTPError:
            return False
