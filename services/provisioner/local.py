"""The local provider: a git clone under the data dir and a vm_agent process next to it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

from services.provisioner.members import VmAgentError, VmAgentProcess, process_alive, this_machine
from services.provisioner.providers import ProvisionError
from services.provisioner.vm_agents import VmAgentPool
from services.pull_requests.github import token_credential
from services.runtime.credentials import CredentialVault
from services.runtime.relay_lease import FileLease
from services.runtime.git_safety import (
    credential_config, git_environment, hardened_config, redact, save_clone_git_dir,
)
from services.runtime.repo_url import RepoCredential, RepoUrl, RepoUrlError, parse_repo_url
from services.runtime.settings import Settings
from services.runtime.vm_agent_commands import task_address
from vm_agent import workspace_lock

log = logging.getLogger(__name__)


class LocalProvider:
    name = "local"

    def __init__(self, settings: Settings, *, ready_timeout_s: float = 60.0) -> None:
        self._settings = settings
        self.pool = VmAgentPool(settings, mix=settings.warm_mix, ready_timeout_s=ready_timeout_s)
        self.credentials = CredentialVault.of(settings)

    def workspace_dir(self, task_id: str, *, attempt: int = 1) -> Path:
        return self._settings.data_dir / "workspaces" / _attempt_dir_name(task_id, attempt)

    def vm_agent_dir(self, task_id: str, *, attempt: int = 1) -> Path:
        """The state dir (store, pid, url) of the task's vm_agent for `attempt`: each attempt has
        its own, so a new attempt's vm_agent records from a fresh store (its output counts from 1)."""
        return self._settings.data_dir / "vm_agents" / _attempt_dir_name(task_id, attempt)

    def saved_agent_home(self, task_id: str) -> Path:
        """Where the agent's home of the task's last vm_agent is kept once that vm_agent is gone
        (0700), until the next one gets a copy; deleted when the task fails or is cancelled."""
        return self._settings.data_dir / "agent_homes" / task_id

    def keep_agent_home(self, task_id: str, *, attempt: int) -> None:
        """Move the gone vm_agent's agent home (its sessions' files) aside for the task's next one."""
        try:
            home = Path((self.vm_agent_dir(task_id, attempt=attempt) / "agent_home").read_text())
        except OSError:
            return  # Assigned before homes were kept (or never assigned): nothing to carry over.
        if not home.is_dir():
            return
        saved = self.saved_agent_home(task_id)
        saved.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        shutil.rmtree(saved, ignore_errors=True)
        shutil.move(home, saved)
        saved.chmod(0o700)

    def restore_agent_home(self, task_id: str, member: VmAgentProcess) -> None:
        """Copy the task's kept agent home into `member`'s (its warm agent already runs with HOME
        there; adapters read their session files at `session/load`, which comes later)."""
        saved = self.saved_agent_home(task_id)
        if saved.is_dir():
            shutil.copytree(saved, member.state_dir / "home", symlinks=True, dirs_exist_ok=True)

    def forget_task(self, task_id: str) -> None:
        """The task takes no more turns: its kept agent home and repo credential are deleted."""
        shutil.rmtree(self.saved_agent_home(task_id), ignore_errors=True)
        self.credentials.discard(task_id)

    def credential_expires_at(self, task_id: str, *, attempt: int = 1) -> float | None:
        """When the token and bus credential of the task's vm_agent expire (set at assignment)."""
        try:
            return float((self.vm_agent_dir(task_id, attempt=attempt) / "credential_expires_at").read_text())
        except (OSError, ValueError):
            return None

    async def clone(
        self, task_id: str, repo: str, base_branch: str | None, *, credential: RepoCredential | None = None,
        attempt: int = 1,
    ) -> Path:
        """Clone `repo` (at `base_branch`) into the task's workspace, replacing a partial one.

        git runs hardened (no hooks, only the allowed transports) and gets `credential` from a
        credential helper. A local repo's objects are copied, not hardlinked (the agent could
        otherwise write the origin's files). Before the agent can see the workspace, its `.git`
        is copied to the vm_agent's state dir: the only git dir the vm_agent runs git on.
        """
        target = self.workspace_dir(task_id, attempt=attempt)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Cloned beside it under a name of its own, then renamed into place: a clone a killed
        # provisioner started (git outlives it) writes only into its own directory.
        cloning = target.parent / f".{target.name}.{secrets.token_hex(4)}"
        replaced: Path | None = None
        branch = ["--branch", base_branch] if base_branch else []
        process = await asyncio.create_subprocess_exec(
            "git", *hardened_config(self._settings.repo_schemes), *credential_config(credential),
            "clone", "--quiet", "--no-hardlinks", *branch, "--", repo, str(cloning),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=git_environment(credential),
        )
        try:
            _, stderr = await process.communicate()
            if process.returncode != 0:
                message = f"git clone {repo} failed: {stderr.decode(errors='replace').strip()}"
                raise ProvisionError(redact(message, credential))
            replaced = target.parent / f".{target.name}.replaced.{secrets.token_hex(4)}"
            with contextlib.suppress(FileNotFoundError):
                target.rename(replaced)  # A partial workspace of an earlier try.
            cloning.rename(target)
        finally:
            shutil.rmtree(cloning, ignore_errors=True)
            if replaced is not None:
                shutil.rmtree(replaced, ignore_errors=True)
        save_clone_git_dir(target, self.vm_agent_dir(task_id, attempt=attempt))
        return target

    async def provision(self, task_id: str, repo: str, base_branch: str | None, *, agent: str,
                        attempt: int = 1) -> str:
        """Clone the workspace and assign it a warm vm_agent (both at once); the vm_agent's URL.

        The repo's credential, sealed by the gateway, is used for the clone and handed to the
        vm_agent (to push); it stays sealed while the task can take a follow-up (a re-provisioned
        workspace clones again) and is discarded when the task fails or is cancelled (`forget_task`).
        """
        return await self._provision(task_id, self.checked_repo(task_id, repo), base_branch, agent=agent,
                                     attempt=attempt)

    def checked_repo(self, task_id: str, repo: str) -> RepoUrl:
        """`repo` checked again (an event may predate the gateway's checks), with its credential."""
        try:
            checked = parse_repo_url(repo, allowed=self._settings.repo_schemes)
        except RepoUrlError as error:
            raise ProvisionError(f"cannot clone this repo: {error}") from None
        # A repo on the configured GitHub host is pushed with its token (as `x-access-token`).
        credential = (checked.credential or self.credentials.open(task_id)
                      or token_credential(self._settings, checked.url))
        return replace(checked, credential=credential)

    async def _provision(self, task_id: str, repo: RepoUrl, base_branch: str | None, *, agent: str,
                         attempt: int) -> str:
        """If the task already has its vm_agent (a provisioner restarted after assigning it),
        that one's URL: the clone was done before it was assigned."""
        state_dir = self.vm_agent_dir(task_id, attempt=attempt)
        async with provisioning(state_dir):  # One provisioner at a time (replicas share the data dir).
            url_file = state_dir / "url"
            if url_file.exists() and _assigned_vm_agent_alive(state_dir):
                return url_file.read_text().strip()  # Another provisioner (or this one, before) did it.
            await asyncio.to_thread(stop_unrecorded_vm_agent, state_dir)
            return await self._clone_and_assign(task_id, repo, base_branch, agent=agent, attempt=attempt)

    async def _clone_and_assign(self, task_id: str, repo: RepoUrl, base_branch: str | None, *, agent: str,
                                attempt: int) -> str:
        state_dir = self.vm_agent_dir(task_id, attempt=attempt)
        url_file = state_dir / "url"
        loop = asyncio.get_running_loop()
        started, ready_before = loop.time(), self.pool.ready_count
        workspace = self.workspace_dir(task_id, attempt=attempt)
        # The vm_agent does not touch the workspace before a session starts: it is taken and
        # assigned while the clone runs.
        assigning = loop.create_task(
            self._take_and_assign(task_id, workspace, state_dir, agent, repo.credential)
        )
        try:
            await self.clone(task_id, repo.url, base_branch, credential=repo.credential, attempt=attempt)
            cloned = loop.time()
            member, taken = await assigning
        except VmAgentError as error:
            raise ProvisionError(str(error)) from error
        except BaseException:  # The clone failed (or we are stopping): that vm_agent is not needed.
            assigning.cancel()
            assigning.add_done_callback(_kill_assigned)
            raise
        if member.workspace is not None:
            try:
                move_clone_into(member.workspace, clone=workspace)
            except OSError as error:
                member.kill()
                raise ProvisionError(f"could not move the clone into the vm_agent's workspace: {error}") from error
        log.info("workspace of %s ready in %.0f ms: clone %.0f ms, vm_agent taken after %.0f ms "
                 "(%d warm before), assigned %.0f ms later", task_id, 1000 * (loop.time() - started),
                 1000 * (cloned - started), 1000 * (taken - started), ready_before,
                 1000 * (loop.time() - taken))
        state_dir.mkdir(parents=True, exist_ok=True)
        try:
            await asyncio.to_thread(self.restore_agent_home, task_id, member)
        except OSError as error:  # The agent then opens a new session (AgentSessionStarted says so).
            log.warning("could not restore the agent home of %s: %s", task_id, error)
        (state_dir / "agent_home").write_text(str(member.state_dir / "home"))
        (state_dir / "pid").write_text(str(member.pid))
        (state_dir / "machine").write_text(this_machine())  # Whose pid it is (watcher.py).
        # From now on it is the task's: a restarted provisioner's pool reset must not stop it.
        (member.state_dir / "pid").unlink(missing_ok=True)
        url_file.write_text(task_address(task_id))
        log_link = state_dir / "vm_agent.log"
        if not log_link.exists():
            log_link.symlink_to(member.state_dir / "vm_agent.log")
        return task_address(task_id)

    async def _take_and_assign(
        self, task_id: str, workspace: Path, state_dir: Path, agent: str, credential: RepoCredential | None
    ) -> tuple[VmAgentProcess, float]:
        member = await self.pool.take(agent)
        taken = asyncio.get_running_loop().time()
        try:
            await self.pool.assign(member, task_id=task_id, workspace=workspace, state_dir=state_dir,
                                   repo_credential=credential)
        except BaseException:
            member.kill()
            raise
        return member, taken


def _assigned_vm_agent_alive(state_dir: Path) -> bool:
    """The vm_agent recorded in `state_dir` was assigned (its credential's expiry is written once
    it accepted) and still runs."""
    try:
        return (state_dir / "credential_expires_at").exists() and process_alive(int((state_dir / "pid").read_text()))
    except (OSError, ValueError):
        return False


@contextlib.asynccontextmanager
async def provisioning(state_dir: Path) -> AsyncIterator[None]:
    """Hold the workspace's provisioning lock (`state_dir/provisioning.lock`, an exclusive `flock`)
    for the block: provisioner replicas sharing the data dir provision a workspace one at a time,
    and one that died mid-way lets go (the kernel releases its lock), so whoever comes next may
    stop the vm_agent it left unrecorded. Waits, without blocking the loop, while another holds it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lease = FileLease(state_dir / "provisioning.lock")  # The relays' lock on a file.
    while not lease.take():
        await asyncio.sleep(0.1)  # Another provisioner is at it: its work decides ours.
    try:
        yield
    finally:
        lease.release()


UNRECORDED_STOP_S = 10.0
"""How long a vm_agent that serves a workspace unrecorded is given to stop (then it is killed)."""


def stop_unrecorded_vm_agent(state_dir: Path) -> None:
    """Stop a vm_agent that holds the workspace (vm_agent/workspace_lock.py) but was never recorded
    as its own: a provisioner died or stalled between assigning it and recording it, and this one
    is about to assign another. One vm_agent per workspace, so a task never runs twice."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pid = workspace_lock.holder(state_dir)
        if pid is None:
            return
        log.warning("stopping vm_agent %d: it serves %s but was never recorded (a provisioner died "
                    "assigning it)", pid, state_dir.name)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)  # Its session: it and the agent it started.
        deadline = time.monotonic() + UNRECORDED_STOP_S
        while workspace_lock.holder(state_dir) == pid and time.monotonic() < deadline:
            time.sleep(0.05)  # A worker thread, waiting out a process's exit.
    if workspace_lock.holder(state_dir) is not None:
        raise ProvisionError(f"a vm_agent of an earlier provisioning holds the workspace of {state_dir.name} "
                             "and does not stop")


def _attempt_dir_name(task_id: str, attempt: int) -> str:
    return task_id if attempt <= 1 else f"{task_id}-a{attempt}"


def move_clone_into(prepared: Path, *, clone: Path) -> None:
    """Make `prepared`, the empty directory a warm agent was started in (bound into its sandbox),
    the workspace at `clone`'s path: the clone's entries move in, then `prepared` takes its place.
    Renames within one directory tree: milliseconds, and a bind mount follows the directory."""
    for entry in clone.iterdir():
        entry.rename(prepared / entry.name)
    clone.rmdir()
    prepared.rename(clone)


def _kill_assigned(assigning: asyncio.Task[tuple[VmAgentProcess, float]]) -> None:
    if not assigning.cancelled() and assigning.exception() is None:
        assigning.result()[0].kill()
