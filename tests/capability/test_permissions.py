"""Permission requests answered by people: a task submitted with the `ask` policy shows its agent's
request over the WebSocket and the API, waits (the board says for whom, the monitor names no gap),
and goes on with what the person chose; unanswered, the request is rejected after the timeout.

The agent is the TEST ONLY `scripted` kind (tests/support/scripted_acp_agent.py): its `write` step
asks permission and writes only when allowed once, so the branch shows which answer it got.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, expect

from events import TERMINAL_TYPES
from tests.capability.test_web_ui import browser, log_in  # noqa: F401 - the browser fixture
from tests.support.agents import baton
from tests.support.api import Api
from tests.support.processes import BatonStack, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

TIMEOUT_S = 25
"""Long enough for a person's answer through four `baton` processes on a loaded CI machine (10 s was not)."""
STACK_ENV = {
    "BATON_TEST_AGENT_KINDS": "scripted",
    "BATON_PERMISSION_TIMEOUT_S": str(TIMEOUT_S),
    # Short enough that a wait for a person taken for silence would be named within the wait.
    "BATON_STALL_AFTER_S": "3",
    "BATON_DEADLINES": "AgentOutput=4",
}


@pytest.fixture(scope="module")
def ask_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatonStack]:
    with running_stack(tmp_path_factory.mktemp("ask"), env=STACK_ENV) as running:
        yield running


@pytest.fixture(scope="module")
def ask_api(ask_stack: BatonStack) -> Api:
    return Api(ask_stack.api, ask_stack.token)


def write_turn(nonce: str) -> str:
    return f"write asked.txt {nonce}\nsay after the write {nonce}\n"


def answer(api: Api, task_id: str, request_id: str, option_id: str) -> httpx.Response:
    return api.http.post(f"/api/tasks/{task_id}/permissions/{request_id}", json={"option_id": option_id})


def open_requests(api: Api, task_id: str) -> list[dict]:
    response = api.http.get(f"/api/tasks/{task_id}/permissions")
    assert response.status_code == 200, response.text
    return [r for r in response.json()["permissions"] if r["answer"] is None]


async def read_until(ws, done: Callable[[dict], bool], *, timeout_s: float = 60) -> list[dict]:
    """Events from the task's stream (one per message) up to the first for which `done` holds."""
    events: list[dict] = []
    async with asyncio.timeout(timeout_s):
        while not events or not done(events[-1]):
            events.append(json.loads(await ws.recv()))
    return events


def run_asked_task(api: Api, origin: Path, nonce: str, decide: Callable[[dict], None]) -> list[dict]:
    """Submit the write turn under `ask`, follow its stream; once the request is on it, `decide`
    gets it (and answers, or not); returns every event up to the task's end."""
    task = api.submit(repo=origin.as_uri(), prompt=write_turn(nonce), agent="scripted", permission_policy="ask")
    assert task["permission_policy"] == "ask"

    async def follow() -> list[dict]:
        async with api.stream(f"/api/tasks/{task['task_id']}/stream?from_seq=1") as ws:
            events = await read_until(ws, lambda e: e["type"] == "PermissionRequested")
            await asyncio.to_thread(decide, events[-1])
            return events + await read_until(ws, lambda e: e["type"] in TERMINAL_TYPES, timeout_s=90)

    # In a thread of its own: Playwright's sync API (the browser test) keeps a loop in this one.
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(asyncio.run, follow()).result()


def types_of(events: list[dict], *wanted: str) -> list[str]:
    return [e["type"] for e in events if e["type"] in wanted]


def branch_file(origin: Path, task_id: str, path: str) -> str | None:
    shown = subprocess.run(["git", "--git-dir", str(origin), "show", f"baton/{task_id}:{path}"],
                           capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else None


def assert_no_gap(api: Api, events: list[dict]) -> None:
    task_id = events[0]["task_id"]
    assert not types_of(events, "AgentStalled", "StepOverdue"), [e["data"] for e in events]
    assert api.task(task_id)["gaps"] == []


PERMISSION_STEPS = ("PermissionRequested", "PermissionAnswerGiven", "PermissionAnswered", "ToolCallUpdated",
                    "AgentOutput", "BranchPushed", "TaskCompleted")


def test_an_answer_lets_the_agent_go_on_with_the_option_chosen(ask_api: Api, origin: Path):
    nonce = secrets.token_hex(6)

    def allow_once(request: dict) -> None:
        task_id, request_id = request["task_id"], request["data"]["request_id"]
        # The API lists the request open, with its options; the board says the task waits for you.
        [listed] = open_requests(ask_api, task_id)
        assert listed["request_id"] == request_id and listed["title"] == "Write asked.txt"
        assert [o["option_id"] for o in listed["options"]] == ["always", "once", "no"]
        wait_for(lambda: ask_api.task(task_id)["waiting_for"] == "person", timeout_s=20,
                 what="the board to show the task waiting for a person")
        # Refused: an option not offered, a request that does not exist.
        assert answer(ask_api, task_id, request_id, "maybe").status_code == 422
        assert answer(ask_api, task_id, "no-such-request", "once").status_code == 404
        assert answer(ask_api, task_id, request_id, "once").status_code == 202

    events = run_asked_task(ask_api, origin, nonce, allow_once)
    task_id = events[0]["task_id"]
    assert events[-1]["type"] == "TaskCompleted", events[-1]
    # All on the stream in order: the request, the person's answer, the agent's answer, then the write.
    assert types_of(events, *PERMISSION_STEPS) == list(PERMISSION_STEPS)
    given = next(e for e in events if e["type"] == "PermissionAnswerGiven")["data"]
    answered = next(e for e in events if e["type"] == "PermissionAnswered")["data"]
    assert given == {"request_id": "1", "option_id": "once", "by": "user"}
    # The person's answer names the request it answers (for the audit trail).
    asked = next(e for e in events if e["type"] == "PermissionRequested")
    assert next(e for e in events if e["type"] == "PermissionAnswerGiven")["causation_id"] == asked["event_id"]
    assert (answered["option_id"], answered["outcome"], answered["by"]) == ("once", "selected", "user")
    # The agent got "once": it wrote the file, and it is on the branch.
    assert branch_file(origin, task_id, "asked.txt") == nonce
    # Answered: a second answer is a conflict, the task no longer waits, and no gap was named.
    assert answer(ask_api, task_id, "1", "no").status_code == 409
    assert ask_api.task(task_id)["waiting_for"] is None
    assert ask_api.task(task_id)["permission_policy"] == "ask"
    assert_no_gap(ask_api, events)


def test_a_rejection_given_with_baton_permissions_is_seen_by_the_agent(
        ask_stack: BatonStack, ask_api: Api, origin: Path):
    nonce = secrets.token_hex(6)
    cli_env = {"BATON_API": ask_stack.api, "BATON_API_TOKEN": ask_stack.token}

    def reject(request: dict) -> None:
        task_id = request["task_id"]
        # `baton permissions` lists the open request with its options (of every task waiting for you
        # once the board has it), then `baton permissions answer` rejects it.
        listed = baton("permissions", task_id, env=cli_env)
        assert listed.returncode == 0 and "Write asked.txt" in listed.stdout and "no (reject_once)" in listed.stdout
        wait_for(lambda: task_id in baton("permissions", env=cli_env).stdout, timeout_s=20,
                 what="baton permissions to list the task among those waiting for you")
        answered = baton("permissions", "answer", task_id, request["data"]["request_id"], "no", env=cli_env)
        assert answered.returncode == 0, answered.stdout + answered.stderr
        # Answered: nothing is waiting any more, and a second answer is refused with the reason.
        again = baton("permissions", "answer", task_id, request["data"]["request_id"], "once", env=cli_env)
        assert again.returncode == 2 and "409" in again.stdout

    events = run_asked_task(ask_api, origin, nonce, reject)
    task_id = events[0]["task_id"]
    answered = next(e for e in events if e["type"] == "PermissionAnswered")["data"]
    assert (answered["option_id"], answered["by"]) == ("no", "user")
    # The agent saw the rejection: its write failed as "not allowed", and nothing was written.
    failed = next(e for e in events if e["type"] == "ToolCallUpdated")["data"]
    assert failed["status"] == "failed" and "not allowed" in (failed["output"] or "")
    assert events[-1]["type"] == "TaskCompleted"
    assert branch_file(origin, task_id, "asked.txt") is None


def test_an_unanswered_request_is_rejected_after_the_timeout_without_a_gap(ask_api: Api, origin: Path):
    nonce = secrets.token_hex(6)
    events = run_asked_task(ask_api, origin, nonce, lambda request: None)
    task_id = events[0]["task_id"]
    asked = next(e for e in events if e["type"] == "PermissionRequested")
    answered = next(e for e in events if e["type"] == "PermissionAnswered")
    # Rejected with the reject option, by the timeout, after it, saying why.
    assert (answered["data"]["option_id"], answered["data"]["by"]) == ("no", "timeout")
    assert f"{TIMEOUT_S}s" in answered["data"]["reason"]
    assert types_of(events, "PermissionRequested", "PermissionAnswered", "ToolCallUpdated", "TaskCompleted") == [
        "PermissionRequested", "PermissionAnswered", "ToolCallUpdated", "TaskCompleted"]
    waited = datetime.fromisoformat(answered["occurred_at"]) - datetime.fromisoformat(asked["occurred_at"])
    assert waited.total_seconds() >= TIMEOUT_S - 0.5
    # A wait longer than the stall and AgentOutput deadlines was a wait for a person, not a gap.
    assert_no_gap(ask_api, events)
    assert branch_file(origin, task_id, "asked.txt") is None
    # Too late now: the request was answered by the timeout.
    late = answer(ask_api, task_id, "1", "once")
    assert late.status_code == 409 and "timeout" in late.json()["detail"]


def test_a_person_answers_in_the_browser_and_the_board_says_who_is_awaited(
        ask_stack: BatonStack, ask_api: Api, origin: Path, browser: Browser):
    nonce = secrets.token_hex(6)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = context.new_page()
        # Submitted in the form, with "Ask me".
        log_in(page, ask_stack)
        page.fill('input[name="repo"]', origin.as_uri())
        page.fill('textarea[name="prompt"]', write_turn(nonce))
        page.select_option('select[name="agent"]', "scripted")
        page.select_option('select[name="permission_policy"]', "ask")
        page.click("button.primary")
        page.wait_for_url(re.compile(r"/tasks/[^/]+$"))
        task_id = page.url.rsplit("/", 1)[1]
        # The request waits with a button per option; the board says the task waits for you.
        buttons = page.locator(".tool-call .permission-answer button")
        expect(buttons).to_have_text(["Always allow", "Allow once", "Reject"], timeout=60_000)
        board = context.new_page()
        board.goto(f"{ask_stack.api}/")
        expect(board.locator(f'[data-task="{task_id}"] .card-waiting')).to_be_visible(timeout=20_000)
        # Answered in the page: the agent goes on with it, and the task completes.
        page.locator('.permission-answer button[data-option-id="once"]').click()
        expect(page.locator(".tool-call .tool-permission")).to_have_text("Permission: Allow once (user)",
                                                                           timeout=30_000)
        expect(page.locator("#state .badge")).to_have_text("completed", timeout=60_000)
        expect(page.locator('#timeline [data-event="PermissionAnswerGiven"] .info')).to_have_text("permission 1: once")
        expect(board.locator(f'[data-task="{task_id}"] .card-waiting')).to_have_count(0)
    finally:
        context.close()
    assert branch_file(origin, task_id, "asked.txt") == nonce


def test_a_task_cancelled_while_it_waits_for_a_person_ends_and_waits_for_nobody(ask_api: Api, origin: Path):
    nonce = secrets.token_hex(6)

    def cancel(request: dict) -> None:
        assert ask_api.http.post(f"/api/tasks/{request['task_id']}/cancel").status_code == 202

    events = run_asked_task(ask_api, origin, nonce, cancel)
    task_id = events[0]["task_id"]
    # Cancelled well before the request would have timed out; nothing was written or pushed.
    assert events[-1]["type"] == "TaskCancelled", events[-1]
    asked = next(e for e in events if e["type"] == "PermissionRequested")
    waited = datetime.fromisoformat(events[-1]["occurred_at"]) - datetime.fromisoformat(asked["occurred_at"])
    assert waited.total_seconds() < TIMEOUT_S
    assert not types_of(events, "BranchPushed", "PermissionAnswered")
    # The board no longer says it waits for you, and no gap was named.
    wait_for(lambda: ask_api.task(task_id)["state"] == "cancelled", timeout_s=20, what="the board to say cancelled")
    assert ask_api.task(task_id)["waiting_for"] is None
    assert_no_gap(ask_api, events)
