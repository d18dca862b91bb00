"""Assigning the vm_agent of a machine of its own (a cloud VM) once it called home: over the bus,
as a local member is assigned, but it clones the workspace itself (the provisioner cannot reach its
disk), with the task's repo credential and the control plane's allowed transports."""

from __future__ import annotations

import time
from pathlib import Path

from services.provisioner.cloud_init import STATE_DIR
from services.provisioner.members import MemberBus, VmAgentError
from services.provisioner.providers import Placement, ProvisionError, WorkspaceOrder
from services.runtime.nats_auth import vm_agent_credentials
from services.runtime.repo_url import RepoUrl
from services.runtime.settings import Settings
from services.runtime.vm_agent_commands import Assignment, CloneOrder, RepoCredentialBody

VM_WORKSPACE = Path("/var/lib/baton/workspace")
"""The task's workspace on the VM: outside the vm_agent's state dir, which its agent never sees."""
ASSIGN_TIMEOUT_S = 600.0
"""The VM's vm_agent answers once its clone is done."""


def vm_task_state_dir(attempt: int) -> Path:
    """Where the VM's vm_agent keeps the task's store and git dir (under its own state dir)."""
    return Path(STATE_DIR) / f"task-a{attempt}"


async def assign_remote_vm_agent(members: MemberBus, settings: Settings, order: WorkspaceOrder,
                                 placement: Placement, repo: RepoUrl) -> float:
    """Hand the VM's vm_agent (known on the bus by its workspace id) its task, to clone `repo` at
    the order's base branch; when its task credential expires. Raises ProvisionError with the reason
    (no answer, or its refusal: e.g. git's, the credential redacted)."""
    expires_at = time.time() + settings.vm_agent_credential_ttl_s
    credential = repo.credential
    assignment = Assignment(
        task_id=order.task_id, workspace=VM_WORKSPACE, state_dir=vm_task_state_dir(order.attempt),
        credential_expires_at=expires_at, nats_credentials=vm_agent_credentials(settings, order.task_id),
        repo_credential=None if credential is None else RepoCredentialBody(
            host=credential.host, username=credential.username, password=credential.password),
        clone=CloneOrder(repo=repo.url, base_branch=order.base_branch, schemes=sorted(settings.repo_schemes)))
    try:
        reply = await members.assign(placement.workspace_id, assignment, timeout_s=ASSIGN_TIMEOUT_S)
    except VmAgentError as error:
        raise ProvisionError(str(error)) from None
    if not reply.accepted:
        raise ProvisionError(f"the vm_agent of {placement.workspace_id} refused its assignment "
                             f"({reply.status}): {reply.reason[:300]}")
    return expires_at
