"""The conversation in a real browser: a follow-up sent from the task page runs as the next turn and
shows as one; the Cancel button stops a running agent; a task waiting for a place says where it
stands in line on the board and on its page, and starts when the place frees up."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from tests.capability.test_web_ui import browser, log_in, page  # noqa: F401 - the browser fixtures
from tests.support.api import Api
from tests.support.processes import BatonStack

pytestmark = pytest.mark.capability


def test_a_follow_up_sent_from_the_task_page_runs_as_turn_two_and_shows_as_one(
    stack: BatonStack, api: Api, origin: Path, page: Page
):
    nonce = secrets.token_hex(6)
    task = api.submit(repo=origin.as_uri(), prompt=f'echo "first {nonce}" > first.txt\necho first {nonce}\n',
                      agent="shell")
    log_in(page, stack, f"/tasks/{task['task_id']}")
    expect(page.locator("#state .badge")).to_have_text("completed", timeout=90_000)

    page.fill("#follow-up-prompt", f'echo "second {nonce}" > second.txt\necho second {nonce}\n')
    page.click("#follow-up-send")
    expect(page.locator("#follow-up-note")).to_have_text("Sent: it runs as the agent's next turn.")

    # The follow-up's prompt opens turn 2 in the conversation, its output follows it, and the
    # turn's own handoffs are rows of the flow marked with their turn, up to its completion.
    expect(page.locator('#output .turn-prompt[data-turn="2"]')).to_contain_text(f"second {nonce}", timeout=90_000)
    expect(page.locator('#timeline [data-event="TaskCompleted"][data-turn="2"]')).to_be_visible(timeout=90_000)
    expect(page.locator('#timeline [data-event="PromptDelivered"][data-turn="2"] .name')).to_have_text(
        "Prompt delivered · turn 2")
    expect(page.locator("#output")).to_contain_text(f"second {nonce}")
    expect(page.locator("#state .badge")).to_have_text("completed")
    # Turn 1's rows were not touched by turn 2's events.
    expect(page.locator('#timeline [data-step="PromptDelivered"].reached')).to_have_count(1)


def test_cancel_in_the_browser_stops_the_agent_and_the_task_in_line_starts_with_the_place(
    origin: Path, page: Page, one_place: BatonStack
):
    nonce = secrets.token_hex(6)
    stack = one_place
    api = Api(stack.api, stack.token)
    long = api.submit(repo=origin.as_uri(), agent="shell",
                      prompt=f'for i in $(seq 1 600); do echo "tick $i {nonce}"; sleep 0.5; done\n')
    waiting = api.submit(repo=origin.as_uri(), agent="shell", prompt=f"echo after {nonce}\n")

    # The board and the waiting task's page say where it stands in line.
    log_in(page, stack)
    card = page.locator(f'[data-task="{waiting["task_id"]}"]')
    expect(card.locator(".card-queue")).to_have_text("waiting for a place: #1 in line", timeout=60_000)
    page.goto(f"{stack.api}/tasks/{waiting['task_id']}")
    expect(page.locator(".facts")).to_contain_text("#1 (waiting for a place)", timeout=30_000)

    # The running task's Cancel button stops its agent: the task ends cancelled, saying by whom.
    page.goto(f"{stack.api}/tasks/{long['task_id']}")
    expect(page.locator("#output")).to_contain_text(f"tick 2 {nonce}", timeout=90_000)
    page.click("#cancel")
    expect(page.locator("#state .badge")).to_have_text("cancelled", timeout=30_000)
    expect(page.locator("#cancelled .reason")).to_contain_text("cancelled by")
    expect(page.locator("#cancel")).to_be_hidden()
    expect(page.locator("#follow-up")).to_be_hidden()

    # The place is free: the task in line runs and completes.
    page.goto(f"{stack.api}/tasks/{waiting['task_id']}")
    expect(page.locator("#state .badge")).to_have_text("completed", timeout=90_000)
    expect(page.locator("#output")).to_contain_text(f"after {nonce}")
