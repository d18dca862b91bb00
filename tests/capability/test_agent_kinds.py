"""Agents a user installs and configures: `baton agents`, `baton agents install`, `baton secrets`,
GET /api/backends, and a task for an agent that cannot run refused at submit with the fix.

The stack's agents dir holds the real codex adapter (from the machine's shared install) and no
other: claude is "not installed" there, codex has no credentials until `baton secrets set`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.agents import baton
from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.processes import BatonStack, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability


@pytest.fixture(scope="module")
def agents_dir(installed_agents, tmp_path_factory: pytest.TempPathFactory) -> Path:
    shared = installed_agents("codex")
    place = tmp_path_factory.mktemp("agents")
    codex = next(shared.glob("codex-*"))
    (place / codex.name).symlink_to(codex)
    return place


@pytest.fixture(scope="module")
def kinds_stack(agents_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatonStack]:
    with running_stack(tmp_path_factory.mktemp("kinds"), agents_dir=agents_dir) as running:
        yield running


@pytest.fixture(scope="module")
def kinds_api(kinds_stack: BatonStack) -> Api:
    return Api(kinds_stack.api, kinds_stack.token)


def backends(api: Api) -> dict[str, dict]:
    response = api.http.get("/api/backends")
    assert response.status_code == 200, response.text
    return {b["name"]: b for b in response.json()["backends"]}


def refused(api: Api, agent: str, origin: Path) -> str:
    """The 422's message for a task for `agent`."""
    response = api.http.post("/api/tasks", json={"repo": origin.as_uri(), "prompt": "p", "agent": agent})
    assert response.status_code == 422, response.text
    return response.json()["detail"]


def assert_nothing_recorded(api: Api, origin: Path) -> None:
    """No task but the one submitted after the refusals (the board is in submission order)."""
    task = api.submit(repo=origin.as_uri(), prompt="true", agent="shell")
    board = wait_for(lambda: (tasks := api.http.get("/api/tasks").json()["tasks"])
                     and any(t["task_id"] == task["task_id"] for t in tasks) and tasks,
                     timeout_s=30, what="the shell task on the board")
    assert [t["task_id"] for t in board if t["repo"] == origin.as_uri()] == [task["task_id"]]


def test_a_task_for_an_agent_that_cannot_run_is_refused_at_submit_with_the_fix(kinds_api: Api, origin: Path):
    # Known but not installed: the command that installs it.
    assert refused(kinds_api, "claude", origin) == "agent 'claude' is not installed: run `baton agents install claude`"
    # Installed, no credentials: the variables and the command that stores one.
    missing = refused(kinds_api, "codex", origin)
    assert "OPENAI_API_KEY" in missing and "`baton secrets set OPENAI_API_KEY`" in missing
    # Unknown: the kinds there are.
    unknown = refused(kinds_api, "cursor", origin)
    assert all(kind in unknown for kind in ("claude", "codex", "gemini", "opencode", "shell"))
    assert_nothing_recorded(kinds_api, origin)


def test_the_api_and_baton_agents_say_what_is_installed_and_what_credentials_are_set(
        kinds_stack: BatonStack, kinds_api: Api, agents_dir: Path):
    kinds = backends(kinds_api)
    assert set(kinds) == {"shell", "claude", "codex", "gemini", "opencode"}
    assert kinds["shell"]["available"] and kinds["shell"]["installed"]
    assert not kinds["claude"]["installed"] and "baton agents install claude" in kinds["claude"]["fix"]
    assert kinds["codex"]["installed"] and not kinds["codex"]["credentials"] and not kinds["codex"]["available"]
    assert kinds["codex"]["version"] and kinds["codex"]["package"]

    listed = baton("agents", "--data-dir", str(kinds_stack.data_dir), env={"BATON_AGENTS_DIR": str(agents_dir)})
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines() if line.strip()}
    assert f"@{kinds['codex']['version']}" in lines["codex"] and " installed " in lines["codex"]
    assert "credentials missing: OPENAI_API_KEY" in lines["codex"]
    assert "not installed" in lines["claude"] and "baton agents install claude" in listed.stdout


def test_a_secret_set_with_baton_secrets_makes_its_agent_ready_and_never_appears_in_clear(
        kinds_stack: BatonStack, kinds_api: Api, origin: Path):
    value = f"sk-test-{secrets.token_hex(12)}"
    data_dir = ["--data-dir", str(kinds_stack.data_dir)]
    stored = baton("secrets", "set", "OPENAI_API_KEY", *data_dir, stdin=value + "\n")
    assert stored.returncode == 0, stored.stderr
    assert value not in stored.stdout + stored.stderr
    listed = baton("secrets", "list", *data_dir)
    assert listed.stdout.split() == ["OPENAI_API_KEY"]

    # The gateway sees it at once (as the provisioner hands it to vm_agents): codex is ready.
    assert backends(kinds_api)["codex"]["available"]

    # A shell task's vm_agent (started after the secret was set: warm ones started before are
    # replaced) holds it; its agent, which declares no variable, does not.
    task = kinds_api.submit(repo=origin.as_uri(), prompt='env | cut -d= -f1; echo "end of env"', agent="shell")
    events = assert_flow_completes(kinds_api, task["task_id"], timeout_s=90)
    names = [e["data"]["text"].strip() for e in events
             if e["type"] == "AgentOutput" and e["data"]["stream"] == "stdout"]
    assert "end of env" in names and "OPENAI_API_KEY" not in names
    assert not [name for name in names if name.startswith("BATON_")]

    # Nowhere under the data dir in clear: not the store, not an event, not a log.
    clear = [path for path in kinds_stack.data_dir.rglob("*")
             if path.is_file() and not path.is_symlink() and value.encode() in path.read_bytes()]
    assert clear == []

    assert baton("secrets", "unset", "OPENAI_API_KEY", *data_dir).returncode == 0
    assert baton("secrets", "list", *data_dir).stdout.split() == []
    assert not backends(kinds_api)["codex"]["credentials"]


def test_baton_secrets_set_refuses_a_value_on_the_command_line_and_unknown_names(kinds_stack: BatonStack):
    data_dir = ["--data-dir", str(kinds_stack.data_dir)]
    assert baton("secrets", "set", "OPENAI_API_KEY", "sk-in-argv", *data_dir).returncode != 0
    unknown = baton("secrets", "set", "BATON_SECRET", *data_dir, stdin="x")
    assert unknown.returncode != 0 and "not a variable any agent declares" in unknown.stdout


def test_baton_agents_install_installs_the_pinned_adapter_once(tmp_path: Path):
    env = {"BATON_AGENTS_DIR": str(tmp_path / "agents")}
    first = baton("agents", "install", "gemini", env=env, timeout_s=600)
    assert first.returncode == 0, first.stdout + first.stderr
    assert (tmp_path / "agents" / "gemini-0.61.0" / "node_modules" / ".bin" / "gemini").exists()
    assert [p.name for p in (tmp_path / "agents").iterdir()] == ["gemini-0.61.0"], "no staging dir left"
    again = baton("agents", "install", "gemini", env=env)
    assert again.returncode == 0 and "is installed" in again.stdout


def test_baton_agents_install_without_node_says_how_to_get_it(tmp_path: Path):
    done = baton("agents", "install", "claude", env={"BATON_AGENTS_DIR": str(tmp_path), "PATH": "/nonexistent"})
    assert done.returncode == 1
    assert "Node.js and npm are needed" in done.stdout and "apt-get install nodejs npm" in done.stdout
    assert list(tmp_path.iterdir()) == []
