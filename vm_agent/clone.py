"""A vm_agent on a machine of its own (a cloud VM) clones its task's repo itself, as the local
provisioner does for a local one: git hardened (no hooks, only the control plane's transports, the
credential from a helper, never in argv or a URL), and the clone's git dir copied to the vm_agent's
state dir before any agent can see the workspace (the only git dir it pushes from)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

from services.runtime.git_safety import (
    credential_config, git_environment, hardened_config, redact, save_clone_git_dir,
)
from services.runtime.repo_url import RepoCredential
from services.runtime.vm_agent_commands import CloneOrder


class CloneError(Exception):
    """The repo could not be cloned; str() is git's reason (the credential redacted)."""


async def clone_workspace(order: CloneOrder, *, workspace: Path, state_dir: Path,
                          credential: RepoCredential | None) -> None:
    """Clone `order.repo` (at its base branch) into `workspace` (replacing a partial one) and keep
    its git dir in `state_dir`; raises CloneError naming git's reason."""
    if workspace.exists():
        shutil.rmtree(workspace)
    workspace.parent.mkdir(parents=True, exist_ok=True)
    branch = ["--branch", order.base_branch] if order.base_branch else []
    process = await asyncio.create_subprocess_exec(
        "git", *hardened_config(order.schemes), *credential_config(credential),
        "clone", "--quiet", *branch, "--", order.repo, str(workspace),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=git_environment(credential),
    )
    _, stderr = await process.communicate()
    if process.returncode != 0:
        message = f"git clone {order.repo} failed: {stderr.decode(errors='replace').strip()}"
        raise CloneError(redact(message, credential))
    await asyncio.to_thread(save_clone_git_dir, workspace, state_dir)
