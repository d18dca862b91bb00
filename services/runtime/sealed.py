"""Small secrets kept on the control plane's disk, encrypted: one 0600 file per name.

AES-GCM with a key derived (HKDF) from the install secret and a purpose label, the file's name
bound as associated data (a file renamed or swapped does not open). What holds the secret is the
data dir's `secret`, never the files themselves.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from services.runtime.settings import ensure_private_dir

_NONCE_BYTES = 12


class SealedFiles:
    """Encrypted files under `directory`, for one `purpose` (its own key)."""

    def __init__(self, directory: Path, install_secret: str, *, purpose: bytes) -> None:
        self.directory = directory
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(install_secret.encode())
        self._aead = AESGCM(key)

    def write(self, name: str, plain: bytes) -> None:
        """Keep `plain` under `name`, replacing what was there (atomically, 0600)."""
        nonce = secrets.token_bytes(_NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, plain, name.encode())
        ensure_private_dir(self.directory)
        target = self.directory / name
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, sealed)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(target)

    def read(self, name: str) -> bytes | None:
        """What is kept under `name`; None if nothing, or if it does not open (another install's
        key, or tampered with)."""
        try:
            sealed = (self.directory / name).read_bytes()
            return self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], name.encode())
        except (OSError, InvalidTag, ValueError):
            return None

    def remove(self, name: str) -> bool:
        """Forget `name`; False if nothing was kept under it."""
        try:
            (self.directory / name).unlink()
        except FileNotFoundError:
            return False
        return True

    def names(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if not p.name.startswith("."))
