"""The fair queue: at most BATON_MAX_RUNNING_TASKS tasks run at once, the rest wait their turn in order."""

from __future__ import annotations

import secrets
import threading
from pathlib import Path

import pytest

from events import TERMINAL_TYPES
from tests.support.api import Api
from tests.support.flow import assert_flow_completes
from tests.support.gate import gate
from tests.support.git_remote import make_origin
from tests.support.processes import BatonStack, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

LIMIT = 2


def test_with_the_limit_at_two_six_tasks_run_two_at_a_time_in_order_and_all_complete(tmp_path: Path):
    with running_stack(tmp_path / "stack", env={"BATON_MAX_RUNNING_TASKS": str(LIMIT)}) as stack, gate() as held:
        api = Api(stack.api, stack.token)
        origin = make_origin(tmp_path)
        # Every task runs until the gate opens: the first two hold their places until then.
        prompt = f"echo start\n{held.wait_command()}echo {secrets.token_hex(4)} > done.txt\necho done\n"

        # Six tasks at once: two get a place, four wait in the order the task runner heard of them
        # (each task's events are read in its own partition: two submitted within moments of each
        # other may be heard in either order, and that order is the line's).
        ids = [api.submit(repo=origin.as_uri(), prompt=prompt, agent="shell")["task_id"] for _ in range(6)]
        line = wait_for(lambda: len(q := _queued_in_order(api, ids)) == 4 and q, timeout_s=30,
                        what="four tasks to wait in line")
        last = line[-1]
        assert api.task(last)["state"] == "queued" and api.task(last)["queue_position"] == 4
        board = {row["task_id"]: row for row in api.http.get("/api/tasks").json()["tasks"]}
        assert [board[task_id]["queue_position"] for task_id in line] == [1, 2, 3, 4]

        # While it waits, its place only shrinks; it starts from the front (two places may free at once).
        seen = PositionWatcher(api, last)
        wait_for(lambda: seen.positions, timeout_s=30, what="the watcher to see the last task's place")
        held.open()
        for task_id in ids:
            assert_flow_completes(api, task_id, timeout_s=120)
        positions = seen.wait()
        assert positions == sorted(positions, reverse=True), positions
        assert positions[0] == 4 and positions[-1] <= LIMIT and len(positions) >= 2, positions
        assert api.task(last)["queue_position"] is None

        # Never more than two held a place at once (the task runner's own events, in stream order),
        # and places were given first come first served.
        events = sorted((e for task_id in ids for e in api.events(task_id)), key=lambda e: e["stream_seq"])
        assert max_running(events) == LIMIT
        assert_places_given_in_line_order(events, ids, waited=4)
        # Waiting for a place is not a gap.
        assert not [e for e in events if e["type"] == "StepOverdue"]


def _queued_in_order(api: Api, ids: list[str]) -> list[str]:
    """The tasks that waited for a place, in the order the task runner queued them."""
    events = sorted((e for task_id in ids for e in api.events(task_id)), key=lambda e: e["stream_seq"])
    return [e["task_id"] for e in events if e["type"] == "TaskQueued"]


def assert_places_given_in_line_order(events: list[dict], ids: list[str], *, waited: int) -> None:
    """Each task got its place once: those that found one free first, then the line, front first;
    each was told its true place in the line when it joined it."""
    started = [e["task_id"] for e in events if e["type"] == "WorkspaceRequested"]
    line = [e for e in events if e["type"] == "TaskQueued"]
    assert sorted(started) == sorted(ids), "each task got a place exactly once"
    assert len(line) == waited and [e["data"]["position"] for e in line] == list(range(1, waited + 1))
    assert started[len(ids) - waited:] == [e["task_id"] for e in line], "the line was served front first"


def max_running(events: list[dict]) -> int:
    """The most tasks between their WorkspaceRequested and their end at any point of the stream."""
    running, most = 0, 0
    for event in events:
        if event["type"] == "WorkspaceRequested":
            running += 1
        elif event["type"] in TERMINAL_TYPES:
            running -= 1
        most = max(most, running)
    return most


class PositionWatcher:
    """Polls a task's `queue_position` until it leaves the line; `wait()` gives the positions seen."""

    def __init__(self, api: Api, task_id: str) -> None:
        self.positions: list[int] = []
        self.done = threading.Event()
        self.error: BaseException | None = None
        own_client = Api(str(api.http.base_url), api.auth["Authorization"].removeprefix("Bearer "))
        self.thread = threading.Thread(target=self._poll, args=(own_client, task_id), daemon=True)
        self.thread.start()

    def _poll(self, api: Api, task_id: str) -> None:
        try:
            while not self.done.wait(0.05):
                task = api.task(task_id)
                if task["state"] != "queued":
                    return
                if task["queue_position"] and (not self.positions or self.positions[-1] != task["queue_position"]):
                    self.positions.append(task["queue_position"])
        except BaseException as error:  # Reported by wait().
            self.error = error
        finally:
            self.done.set()

    def wait(self) -> list[int]:
        self.thread.join(timeout=60)
        assert self.error is None, self.error
        return self.positions


def test_a_task_runner_killed_while_tasks_wait_starts_each_once_in_order(tmp_path: Path, one_place: BatonStack):
    stack = one_place
    api = Api(stack.api, stack.token)
    origin = make_origin(tmp_path)
    with gate() as held:
        prompt = f"echo start\n{held.wait_command()}echo done\n"  # The first holds its place until the gate opens.
        ids = [api.submit(repo=origin.as_uri(), prompt=prompt, agent="shell")["task_id"] for _ in range(3)]
        wait_for(lambda: len(_queued_in_order(api, ids)) == 2, timeout_s=30, what="two tasks to wait")

        # kill -9 while two wait, and again once the first place is handed on.
        stack.kill_service("task-runner")
        held.open()
        wait_for(lambda: any(e["type"] == "WorkspaceRequested" for e in api.events(ids[1])), timeout_s=60,
                 what="the second task to get the place")
        stack.kill_service("task-runner")

        for task_id in ids:
            assert_flow_completes(api, task_id, timeout_s=120)
    events = sorted((e for task_id in ids for e in api.events(task_id)), key=lambda e: e["stream_seq"])
    # Each task got its place exactly once, in line order, one at a time.
    assert_places_given_in_line_order(events, ids, waited=2)
    assert max_running(events) == 1
