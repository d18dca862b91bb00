"""An agent runs sandboxed: it sees no Baton secret and cannot read the data dir, yet does its work.

A shell task prints its environment and tries to read the install secret, the API token and the
data dir's listing; what it printed (its AgentOutput events) must hold none of Baton's secrets,
and the file it wrote in its workspace must arrive on the pushed branch.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.cli.data_dir_processes import process_environ
from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.git_remote import branch_file, make_origin
from tests.support.processes import BatonStack, running_stack
from vm_agent.sandbox import ALLOWED_ENV

pytestmark = pytest.mark.capability

# Variables bash sets itself, and the agent's own HOME.
SHELL_OWN_ENV = frozenset({"HOME", "PWD", "OLDPWD", "SHLVL", "_"})
LISTING_START, LISTING_END = "--- listing of the data dir", "--- end of listing"


def prying_prompt(data_dir: Path, watchdog_socket: str) -> str:
    return (
        "env\n"
        f"ls {watchdog_socket}\n"
        'cat "$BATON_DATA_DIR/secret"\n'
        f"echo '{LISTING_START}'; ls -A {data_dir}; echo '{LISTING_END}'\n"
        f"cat {data_dir}/secret\n"
        f"cat {data_dir}/api-token\n"
        "echo 'written in the sandbox' > proof.txt\n"
    )


def baton_secrets(stack: BatonStack) -> dict[str, str]:
    """{where it is: value} of every secret of the stack's data dir (install secret, API token,
    each NATS credential's JWT and seed)."""
    found = {name: (stack.data_dir / name).read_text().strip() for name in ("secret", "api-token")}
    for path in sorted((stack.data_dir / "nats-auth").rglob("*")) if (stack.data_dir / "nats-auth").is_dir() else ():
        if path.is_file():
            for number, line in enumerate(path.read_text(errors="replace").splitlines()):
                if len(line.strip()) >= 20 and not line.startswith("-----"):
                    found[f"{path.relative_to(stack.data_dir)}:{number + 1}"] = line.strip()
    return found


def run_prying_task(api: Api, stack: BatonStack, origin: Path) -> None:
    # The shell agent pries; the task still goes the whole way.
    # baton up's watchdog socket, as its services were given it: an agent that reached it could
    # crowd their pings out and get them killed.
    watchdog_socket = process_environ(stack.service_pid("gateway"))["NOTIFY_SOCKET"]
    task = api.submit(repo=origin.as_uri(), prompt=prying_prompt(stack.data_dir, watchdog_socket), agent="shell")
    events = assert_flow_completes(api, task["task_id"], timeout_s=90)
    outputs = [e["data"] for e in events if e["type"] == "AgentOutput"]
    stdout = "".join(o["text"] for o in outputs if o["stream"] == "stdout")
    stderr = "".join(o["text"] for o in outputs if o["stream"] == "stderr")
    printed = stdout + stderr

    # Its environment is the allowlist: no BATON_ variable (NATS URL, vm_agent token, database URL…).
    names = {line.split("=", 1)[0] for line in stdout.splitlines() if "=" in line and LISTING_START not in line}
    assert not {name for name in names if name.startswith("BATON_")}, names
    assert names <= ALLOWED_ENV | SHELL_OWN_ENV | {n for n in names if n.startswith("LC_")}, names
    assert "HOME=/agent-home" in stdout.splitlines(), "the agent's home is its own"

    # No secret of the data dir shows up anywhere in what it printed.
    for where, value in baton_secrets(stack).items():
        assert value not in printed, f"the agent read {where}"

    # Every read of the data dir failed: not there, as far as the agent can see.
    for path in ("/secret", f"{stack.data_dir}/secret", f"{stack.data_dir}/api-token"):
        assert f"cat: {path}: No such file or directory" in stderr, stderr
    assert f"ls: cannot access '{watchdog_socket}': No such file or directory" in stderr, stderr
    listing = stdout.split(LISTING_START, 1)[1].split(LISTING_END, 1)[0].split()
    assert listing == [], f"the agent listed the data dir: {listing}"

    # What it wrote in its workspace is on the pushed branch.
    assert branch_file(origin, f"baton/{task['task_id']}", "proof.txt") == "written in the sandbox"

    # And /api/health says how agents are confined.
    health = api.http.get("/api/health").json()
    assert health["sandbox"] == "bwrap", health
    assert "agents: sandboxed with bwrap" in stack.log_path.read_text()


def test_an_agent_sees_no_secret_and_cannot_read_the_data_dir(api: Api, stack: BatonStack, origin: Path):
    run_prying_task(api, stack, origin)


@pytest.fixture
def data_dir_outside_tmp() -> Iterator[Path]:
    """A root outside /tmp, as `~/.baton` is (the agent's own /tmp would hide one under /tmp anyway)."""
    if not Path("/var/tmp").is_dir():
        pytest.skip("no /var/tmp here")
    with tempfile.TemporaryDirectory(dir="/var/tmp", prefix="baton-sandbox-test-") as root:
        yield Path(root)


def test_a_data_dir_outside_tmp_is_hidden_too(data_dir_outside_tmp: Path):
    with running_stack(data_dir_outside_tmp) as stack:
        run_prying_task(Api(stack.api, stack.token), stack, make_origin(data_dir_outside_tmp))


def test_without_a_sandbox_baton_up_and_health_say_so_loudly(tmp_path: Path):
    with running_stack(tmp_path, env={"BATON_SANDBOX": "none"}) as stack:
        health = Api(stack.api, stack.token).http.get("/api/health").json()
        assert health["sandbox"].startswith("none — agents can read the data dir"), health
        assert "NO AGENT SANDBOX" in health["warning"], health
        assert "NO AGENT SANDBOX" in stack.log_path.read_text()
