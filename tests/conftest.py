"""Fixtures that start real processes: nats-server, `baton up`, bare git remotes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.agents import install_agents
from tests.support.api import Api
from tests.support.git_remote import make_origin
from tests.support.postgres import fresh_postgres_database
from tests.support.processes import BatonStack, running_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatonStack]:
    """A whole, healthy Baton (its own NATS, data dir and port) shared by the tests that only submit."""
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


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
        for name in ("stack", "faulty_stack"):
            running = item.funcargs.get(name)
            if isinstance(running, BatonStack):
                report.sections.append((f"{name} logs", running.logs()))
