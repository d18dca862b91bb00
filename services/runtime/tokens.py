"""Per-workspace vm_agent tokens, derived from the install secret so no event ever carries one.

A token names its task and its expiry; the vm_agent is handed the token and the expiry (never the
secret) and refuses it afterwards. The task runner derives the same token from the task id and
the expiry announced in `WorkspaceReady`.
"""

from __future__ import annotations

import hashlib
import hmac


def vm_agent_token(secret: str, task_id: str, expires_at: float | None = None) -> str:
    scope = f"vm_agent/{task_id}" if expires_at is None else f"vm_agent/{task_id}/{int(expires_at)}"
    return hmac.new(secret.encode(), scope.encode(), hashlib.sha256).hexdigest()
