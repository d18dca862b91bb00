"""The real agents' adapters, installed once per machine and shared by every test run.

`install_agents("claude", …)` runs `baton agents install` into AGENTS_DIR
(`~/.cache/baton/agents`, or BATON_TEST_AGENTS_DIR): a fresh machine downloads the pinned
adapters from the npm registry once; later runs find them there. Pass the dir on to a stack:
`running_stack(root, agents_dir=install_agents("claude"))`.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

from tests.support.processes import REPO_ROOT

AGENTS_DIR = Path(os.environ.get("BATON_TEST_AGENTS_DIR", Path.home() / ".cache" / "baton" / "agents"))
INSTALL_TIMEOUT_S = 900


def baton(*args: str, env: dict[str, str] | None = None, stdin: str | None = None,
          timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """`baton ARGS…` as a user runs it, with `env` added to the test's environment."""
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args], input=stdin,
                          capture_output=True, text=True, cwd=REPO_ROOT, timeout=timeout_s,
                          env={**os.environ, **(env or {})})


@functools.cache
def install_agents(*names: str) -> Path:
    """AGENTS_DIR, with the pinned adapter of each agent `names` installed in it."""
    done = baton("agents", "install", *names, env={"BATON_AGENTS_DIR": str(AGENTS_DIR)},
                 timeout_s=INSTALL_TIMEOUT_S)
    assert done.returncode == 0, f"baton agents install {' '.join(names)} failed:\n{done.stdout}{done.stderr}"
    return AGENTS_DIR
