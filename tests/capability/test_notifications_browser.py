"""Browser notifications in chromium: the page of a task being watched shows one when the task
completes or fails (not for what had already happened when it was opened), and asks permission
only from a click."""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, expect

from tests.capability.test_web_ui import browser  # noqa: F401 - Debian's chromium, as every browser test
from tests.support.api import Api
from tests.support.git_remote import make_origin
from tests.support.processes import BatonStack, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

RECORD_NOTIFICATIONS = """
window.__notified = [];
window.__asked = 0;
const Real = window.Notification;
window.Notification = class {
  constructor(title, options) { window.__notified.push({ title, body: (options || {}).body || "" }); }
  static get permission() { return Real.permission; }
  static requestPermission() { window.__asked += 1; return Real.requestPermission(); }
};
"""
"""Wraps the Notification API: each notification the page shows is recorded (and not shown)."""
NOT_YET_ASKED = """
window.__asked = 0;
let permission = "default";
window.Notification = class {
  constructor() { throw new Error("a notification before permission was given"); }
  static get permission() { return permission; }
  static requestPermission() { window.__asked += 1; permission = "granted"; return Promise.resolve(permission); }
};
"""
"""A browser that has not asked the user yet (headless chromium says `denied` to everything): the
user grants permission when asked."""


def recording_context(browser: Browser, stack: BatonStack, *, granted: bool) -> BrowserContext:
    context = browser.new_context(permissions=["notifications"] if granted else [], base_url=stack.api)
    context.add_init_script(RECORD_NOTIFICATIONS if granted else NOT_YET_ASKED)
    return context


def test_the_watched_task_notifies_when_it_completes_or_fails_and_permission_is_asked_on_a_click(
        tmp_path: Path, browser: Browser):
    # A follow-up's push never comes (fault follow_up_push): the task fails in its second turn,
    # while its page is open, seconds after the follow-up (a deadline for the push short enough for
    # the test, long enough that the first turn's real push makes it on a loaded machine: 2 s did not).
    faulty_turn_two = {"BATON_DEADLINES": "BranchPushed=12", "BATON_OVERDUE_BACKOFF_S": "0.5"}
    with running_stack(tmp_path / "stack", faults="follow_up_push", env=faulty_turn_two) as stack:
        api = Api(stack.api, stack.token)
        origin = make_origin(tmp_path)
        earlier = api.submit(repo=origin.as_uri(), agent="shell", prompt="echo done before\n")["task_id"]
        api.wait_for_end(earlier, timeout_s=90)

        context = recording_context(browser, stack, granted=True)
        try:
            page = context.new_page()
            # A task that had already ended when its page was opened: nothing to tell.
            page.goto(f"/tasks/{earlier}?token={stack.token}")
            expect(page.locator("#state")).to_contain_text("completed", timeout=30_000)
            assert page.evaluate("window.__notified") == []
            expect(page.locator("#notify")).to_be_hidden()  # Already granted: nothing to ask.

            # A task watched while it runs: its completion is a notification.
            running = api.submit(repo=origin.as_uri(), agent="shell",
                                 prompt="for i in 1 2 3 4 5 6; do echo $i; sleep 0.5; done\n")["task_id"]
            page.goto(f"/tasks/{running}")
            notified = wait_for(lambda: page.evaluate("window.__notified"), timeout_s=90,
                                what="a browser notification of the completion")
            assert notified == [{"title": f"Baton task {running} completed", "body": f"baton/{running}"}]

            # The same task, still watched, fails in a follow-up's turn: its failure is one, with the reason.
            api.http.post(f"/api/tasks/{running}/messages", json={"prompt": "echo again\n"}).raise_for_status()
            notified = wait_for(lambda: (seen := page.evaluate("window.__notified"))[1:] and seen, timeout_s=90,
                                what="a browser notification of the failure")
            assert [n["title"] for n in notified] == [f"Baton task {running} completed", f"Baton task {running} failed"]
            assert "BranchPushed missing" in notified[1]["body"]
            expect(page.locator("#state .badge")).to_have_text("failed")
        finally:
            context.close()

        # Not yet asked: the page offers a button; the browser is asked only when it is clicked.
        context = recording_context(browser, stack, granted=False)
        try:
            page = context.new_page()
            page.goto(f"/tasks/{earlier}?token={stack.token}")
            button = page.locator("#notify")
            expect(button).to_be_visible(timeout=30_000)
            assert page.evaluate("window.__asked") == 0
            button.click()
            wait_for(lambda: page.evaluate("window.__asked") == 1, timeout_s=10, what="permission asked on the click")
            expect(button).to_be_hidden()  # Granted: nothing more to ask.
        finally:
            context.close()
