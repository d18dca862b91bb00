"""Per-workspace vm_agent tokens, derived from the install secret so no event ever carries one."""

from __future__ import annotations

import hashlib
import hmac


def vm_agent_token(secret: str, task_id: str) -> str:
    return hmac.new(secret.encode(), f"vm_agent/{task_id}".encode(), hashlib.sha256).hexdigest()
