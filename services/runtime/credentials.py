"""The control plane's vault for the credential a task's repo URL carried.

The gateway seals it for the task before anything is recorded; the provisioner opens it to
clone and hands it to the task's vm_agent (which keeps it in memory to push), then discards it.
On disk it is only ever encrypted (AES-GCM, a key derived from the install secret, bound to
the task id), in 0600 files under `<data dir>/credentials/`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path


from services.runtime.repo_url import RepoCredential
from services.runtime.sealed import SealedFiles
from services.runtime.settings import Settings

_TASK_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class CredentialVault:
    def __init__(self, directory: Path, install_secret: str) -> None:
        self._files = SealedFiles(directory, install_secret, purpose=b"baton repo credentials v1")

    @classmethod
    def of(cls, settings: Settings) -> CredentialVault:
        return cls(settings.data_dir / "credentials", settings.install_secret())

    def seal(self, task_id: str, credential: RepoCredential) -> None:
        """Keep `credential` for `task_id`, encrypted (replacing one sealed before)."""
        plain = json.dumps({"host": credential.host, "username": credential.username,
                            "password": credential.password}).encode()
        self._files.write(self._name(task_id), plain)

    def open(self, task_id: str) -> RepoCredential | None:
        """The credential sealed for `task_id`, or None if there is none (or it is unreadable:
        another install's secret, or tampered with)."""
        plain = self._files.read(self._name(task_id))
        return None if plain is None else RepoCredential(**json.loads(plain))

    def discard(self, task_id: str) -> None:
        self._files.remove(self._name(task_id))

    @staticmethod
    def _name(task_id: str) -> str:
        if not _TASK_ID.match(task_id):
            raise ValueError(f"not a task id: {task_id!r}")
        return task_id
