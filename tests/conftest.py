"""Fixtures that start real processes: nats-server, `baton up`, bare git remotes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.support.agents import install_agents
from tests.support.api import Api, end_every_task
from tests.support.git_remote import make_origin
from tests.support.postgres import fresh_postgres_database
from services.runtime.bus import Bus, open_bus
from tests.support.processes import BatonStack, NatsServer, finish_stopping, running_stack, stops_off_the_tests_path


@pytest.fixture(scope="session", autouse=True)
def stacks_stop_off_the_tests_path() -> Iterator[None]:
    """A test's stack stops while the next test runs; the run ends once every stop did (this
    fixture is set up first, so it is torn down last, after the shared stacks')."""
    with stops_off_the_tests_path():
        yield


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A nats-server with JetStream of the test's own, on a free port."""
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    """Baton's bus on the test's own nats-server (streams set up as a service sets them up)."""
    async with open_bus(nats_server.url, name="test") as connected:
        yield connected


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatonStack]:
    """A whole, healthy Baton (its own NATS, data dir and port) shared by the tests that only submit."""
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture(scope="session")
def faulty_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatonStack]:
    """A stack whose vm_agents silently never deliver a prompt (fault `prompt_delivery`, the
    default deadlines), shared by the tests that only look at how that shows."""
    with running_stack(tmp_path_factory.mktemp("faulty"), faults="prompt_delivery") as running:
        yield running


@pytest.fixture(scope="session")
def stalling_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatonStack]:
    """A stack that calls an agent silent for 2 s stalled (BATON_STALL_AFTER_S=2), shared by the
    stall tests of the flow and turn monitors (each judges only its own task)."""
    with running_stack(tmp_path_factory.mktemp("stalling"), env={"BATON_STALL_AFTER_S": "2"}) as running:
        yield running


@pytest.fixture(scope="session")
def one_place_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatonStack]:
    """A stack that runs one task at a time (BATON_MAX_RUNNING_TASKS=1); tests take it through
    `one_place`, which frees the place between them."""
    with running_stack(tmp_path_factory.mktemp("one-place"), env={"BATON_MAX_RUNNING_TASKS": "1"}) as running:
        yield running


@pytest.fixture
def one_place(one_place_stack: BatonStack) -> Iterator[BatonStack]:
    """The one-place stack with its place free when the test starts: whatever task the test leaves
    unended is cancelled after it (and seen to end), so the next test's first task runs at once."""
    yield one_place_stack
    end_every_task(Api(one_place_stack.api, one_place_stack.token))


@pytest.fixture(scope="session")
def installed_agents() -> Callable[..., Path]:
    """`installed_agents("claude", …)`: the shared agents dir with those adapters installed (once
    per machine; see tests/support/agents.py); give it to `running_stack(…, agents_dir=…)`."""
    return install_agents


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test session, dropped afterwards."""
    with fresh_postgres_database() as url:
        yield url
        finish_stopping()  # The stacks on it have stopped before it is dropped.


@pytest.fixture(scope="session")
def api(stack: BatonStack) -> Api:
    return Api(stack.api, stack.token)


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    """A fresh bare repo (the task's origin), with `main` seeded."""
    return make_origin(tmp_path)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # A failing test that used a stack shows that stack's logs.
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.when == "call":
        for name, running in item.funcargs.items():
            if isinstance(running, BatonStack):
                report.sections.append((f"{name} logs", running.logs()))
