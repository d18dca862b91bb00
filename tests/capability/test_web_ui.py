"""The web UI in a real browser against a real stack: submit, watch live, reload mid-run, see it done."""

from __future__ import annotations

import json
import os
import re
import secrets
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, WebSocketRoute, expect, sync_playwright

from events import FLOW_CONTRACT
from tests.support.api import Api
from tests.support.processes import REPO_ROOT, BatonStack, running_stack

pytestmark = pytest.mark.capability

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LINES = 30
SCREENSHOT = REPO_ROOT / "docs" / "task-page.png"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        # `.ci/bootstrap test` installs it: in CI a missing browser is a failure, not a skip.
        missing = f"the web UI tests drive Debian's chromium at {CHROMIUM} (apt-get install chromium)"
        pytest.fail(missing) if os.environ.get("CI") else pytest.skip(missing)
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield opened
    finally:
        context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def counting_prompt(nonce: str) -> str:
    return f'for i in $(seq 1 {LINES}); do echo "line $i {nonce}"; sleep 0.2; done\necho "{nonce}" > done.txt\n'


def log_in(page: Page, stack: BatonStack, path: str = "/") -> None:
    """Open the login URL `baton up` printed, as a user does: the session cookie is set and the
    page comes back without the token in its URL."""
    page.goto(f"{stack.api}{path}?token={stack.token}")
    expect(page).to_have_url(f"{stack.api}{path}")


def output_lines(page: Page, nonce: str) -> Counter:
    text = page.locator("#output").inner_text()
    return Counter(line.strip() for line in text.splitlines() if nonce in line)


def test_ui_routes_serve_the_page_and_leave_the_api_alone(stack: BatonStack):
    with httpx.Client(base_url=stack.api, timeout=10, headers=stack.auth) as http:
        for path in ("/", "/tasks/0123456789abcdef"):
            response = http.get(path)
            assert response.status_code == 200 and "/static/app.js" in response.text, path
        assert http.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        assert http.get("/static/style.css").headers["content-type"].startswith("text/css")
        assert http.get("/static/nope.js").status_code == 404
        assert http.get("/static/..%2Froutes%2Fui.py").status_code == 404
        assert http.get("/api/tasks").json().keys() == {"tasks"}
        assert http.get("/api/tasks/0123456789abcdef").status_code == 404
        assert "swagger" in http.get("/docs").text.lower()


CUT_AFTER = 10
"""Events the page's first task-stream connection gets before the test cuts it."""


def test_a_task_submitted_in_the_browser_streams_live_and_survives_a_reload(
    stack: BatonStack, api: Api, origin: Path, page: Page
):
    nonce = secrets.token_hex(6)
    # The page's first connection to the task's stream is cut after a few events; the page must
    # resume with from_seq = last + 1 and show nothing twice.
    stream_urls: list[str] = []

    def route_task_stream(ws: WebSocketRoute) -> None:
        stream_urls.append(ws.url)
        server = ws.connect_to_server()
        if len(stream_urls) > 1:
            return  # later connections pass through untouched
        forwarded = 0

        def forward(message: str | bytes) -> None:
            # The page asks for batches (a JSON array per message): cut after exactly 10 events.
            nonlocal forwarded
            if forwarded == CUT_AFTER:
                return  # already cut
            data = json.loads(message)
            events = data if isinstance(data, list) else [data]
            kept = events[: max(0, CUT_AFTER - forwarded)]
            forwarded += len(kept)
            if kept:
                ws.send(json.dumps(kept) if isinstance(data, list) else message)
            if forwarded == CUT_AFTER:
                ws.close(code=4000, reason="cut by the test")
                server.close()

        server.on_message(forward)

    page.route_web_socket(re.compile(r"/api/tasks/[^/]+/stream"), route_task_stream)

    # Submit on the board.
    log_in(page, stack)
    expect(page.locator("select[name=agent] option[value=shell]")).to_be_enabled(timeout=10_000)
    page.fill("input[name=repo]", origin.as_uri())
    page.fill("textarea[name=prompt]", counting_prompt(nonce))
    page.select_option("select[name=agent]", "shell")
    page.click("button[type=submit]")

    # Land on the task page and watch the output arrive.
    expect(page).to_have_url(re.compile(r"/tasks/[0-9a-f]+$"), timeout=10_000)
    task_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("h1")).to_contain_text(task_id)
    # Line 8 is past the cut (5 handoffs, then one AgentOutput per line): it came on a new connection.
    expect(page.locator("#output")).to_contain_text(f"line 8 {nonce}", timeout=60_000)
    assert len(stream_urls) >= 2, "the page did not reconnect after its stream was cut"
    assert re.search(r"from_seq=([2-9]|\d\d+)", stream_urls[1]), f"reconnected without resuming: {stream_urls}"

    # Reload mid-run: the page rebuilds from the stream's start.
    assert f"line {LINES} {nonce}" not in page.locator("#output").inner_text(), "the run ended before the reload"
    page.reload()
    expect(page.locator("#output")).to_contain_text(f"line 1 {nonce}", timeout=30_000)

    # Completed: the badge, the branch, every handoff of the flow, every line exactly once.
    expect(page.locator("#state .badge")).to_have_text("completed", timeout=90_000)
    expect(page.locator("#branch .branch")).to_have_text(f"baton/{task_id}")
    expect(page.locator("#output")).to_contain_text(f"line {LINES} {nonce}")
    assert output_lines(page, nonce) == Counter(f"line {i} {nonce}" for i in range(1, LINES + 1))
    steps = page.locator("#timeline [data-step]")
    assert steps.evaluate_all("rows => rows.map(r => r.dataset.step)") == list(FLOW_CONTRACT)
    for step in FLOW_CONTRACT:
        expect(page.locator(f'#timeline [data-step="{step}"]')).to_have_class(re.compile(r"\breached\b"))
    assert api.task(task_id)["state"] == "completed"

    if os.environ.get("BATON_SCREENSHOT") == "1":
        page.wait_for_function("document.fonts.ready.then(() => true)")
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))


ROWS = 1000
"""Output lines of the long task: more than the task page opens with (its last 400 events)."""


def test_a_long_task_opens_on_its_newest_output_and_shows_earlier_output_on_demand(
    stack: BatonStack, api: Api, origin: Path, page: Page
):
    nonce = secrets.token_hex(6)
    task = api.submit(repo=origin.as_uri(), prompt=f'for i in $(seq 1 {ROWS}); do echo "row $i {nonce}"; done\n',
                      agent="shell")
    api.wait_for_end(task["task_id"])

    # A late viewer: the newest lines first, the whole flow in the timeline, the outcome.
    log_in(page, stack, f"/tasks/{task['task_id']}")
    expect(page.locator("#output")).to_contain_text(f"row {ROWS} {nonce}", timeout=30_000)
    expect(page.locator("#state .badge")).to_have_text("completed")
    for step in FLOW_CONTRACT:
        expect(page.locator(f'#timeline [data-step="{step}"]')).to_have_class(re.compile(r"\breached\b"))
    assert f"row 1 {nonce}" not in page.locator("#output").inner_text()

    # Earlier output comes a page at a time, above what is shown, until the first line.
    earlier = page.locator("#earlier")
    for _ in range(5):
        if not earlier.is_visible():
            break
        earlier.click()
        expect(earlier).to_be_enabled()
    expect(earlier).to_be_hidden()
    assert output_lines(page, nonce) == Counter(f"row {i} {nonce}" for i in range(1, ROWS + 1))
    assert page.locator("#output").inner_text().find(f"row 1 {nonce}") < page.locator("#output").inner_text().find(
        f"row {ROWS} {nonce}"), "the earlier output is not above the newest"


def test_the_board_moves_a_task_to_completed_live(stack: BatonStack, api: Api, origin: Path, page: Page):
    log_in(page, stack)
    expect(page.locator(".conn")).to_have_text("live", timeout=10_000)
    task = api.submit(repo=origin.as_uri(), prompt="echo board > board.txt\n", agent="shell")
    card = page.locator(f'[data-task="{task["task_id"]}"]')
    expect(card).to_be_visible(timeout=10_000)
    expect(page.locator(f'[data-column=completed] [data-task="{task["task_id"]}"]')).to_be_visible(timeout=90_000)
    expect(card).to_have_count(1)
    expect(card).to_contain_text(f"baton/{task['task_id']}")
    card.click()
    expect(page).to_have_url(re.compile(rf"/tasks/{task['task_id']}$"))
    expect(page.locator("#state .badge")).to_have_text("completed", timeout=10_000)


def test_the_form_shows_the_gateways_422_readably(stack: BatonStack, page: Page):
    log_in(page, stack)
    expect(page.locator("select[name=agent] option[value=shell]")).to_be_enabled(timeout=10_000)
    page.fill("input[name=repo]", "-oops")
    page.fill("textarea[name=prompt]", "echo hi")
    page.click("button[type=submit]")
    errors = page.locator(".form-errors")
    expect(errors).to_contain_text("repo: must not start with '-'")
    expect(page.locator("input[name=repo]")).to_have_attribute("aria-invalid", "true")
    assert page.url.rstrip("/") == stack.api


def test_every_page_warns_loudly_when_faults_are_injected(faulty_stack: BatonStack, page: Page):
    task = Api(faulty_stack.api, faulty_stack.token).submit(repo="file:///nowhere.git", prompt="echo hi", agent="shell")
    log_in(page, faulty_stack)
    for path in ("/", f"/tasks/{task['task_id']}"):
        page.goto(faulty_stack.api + path)
        banner = page.locator("#fault-banner")
        expect(banner).to_be_visible(timeout=10_000)
        expect(banner).to_contain_text("Fault injection on: prompt_delivery")
        expect(banner).to_have_css("background-color", "rgb(192, 38, 45)")


def test_no_fault_banner_on_a_healthy_install(stack: BatonStack, page: Page):
    log_in(page, stack)
    expect(page.locator("#health")).not_to_have_text("checking…", timeout=10_000)
    expect(page.locator("#fault-banner")).to_be_hidden()


def test_a_browser_without_the_login_url_is_told_how_to_log_in_and_sees_no_task(
        stack: BatonStack, api: Api, origin: Path, page: Page):
    nonce = secrets.token_hex(6)
    task = api.submit(repo=origin.as_uri(), prompt=f"echo {nonce} > private.txt\n", agent="shell")

    for path in ("/", f"/tasks/{task['task_id']}"):
        page.goto(stack.api + path)
        notice = page.locator("#login-needed")
        expect(notice).to_be_visible(timeout=10_000)
        expect(notice).to_contain_text("Open the login URL that baton up printed")
        expect(page.locator("#health")).to_have_text("Not logged in")
        # Nothing of the task reached the page: not its prompt, not its repo.
        assert nonce not in page.content() and str(origin) not in page.content()


def test_the_login_url_logs_the_browser_in_and_the_board_goes_live(stack: BatonStack, api: Api, page: Page):
    log_in(page, stack)

    expect(page.locator(".conn")).to_have_text("live", timeout=10_000)
    expect(page.locator("[data-column=queued]")).to_be_visible()
    expect(page.locator("#login-needed")).to_have_count(0)
    # The session cookie is the browser's only credential: HttpOnly, SameSite=Strict, not the token.
    cookie = next(c for c in page.context.cookies() if c["name"] == f"baton_session_{stack.port}")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != stack.token


def scripted_turn(nonce: str) -> str:
    """A prompt for the TEST ONLY `scripted` agent kind (tests/support/scripted_acp_agent.py): a real
    ACP agent's turn, one step a line."""
    return "\n".join([
        f"think The README needs a line for {nonce}",
        "plan Read the README | Add the line",
        "say I will update the README",
        f"write README.md # test repo\\nThe {nonce} line\\n",
        "run git status --short",
        "usage 1200 200000 0.0123",
        f"say Done with {nonce}",
        "tokens 1000 234",
    ])


def test_a_real_agents_turn_reads_as_a_conversation_with_tool_calls_and_diffs(
    tmp_path: Path, origin: Path, page: Page
):
    nonce = secrets.token_hex(6)
    with running_stack(tmp_path / "scripted", env={"BATON_TEST_AGENT_KINDS": "scripted"}) as scripted_stack:
        task = Api(scripted_stack.api, scripted_stack.token).submit(
            repo=origin.as_uri(), prompt=scripted_turn(nonce), agent="scripted")
        log_in(page, scripted_stack, f"/tasks/{task['task_id']}")
        expect(page.locator("#state .badge")).to_have_text("completed", timeout=90_000)

    # Each tool call is a card with its status; the edit shows its diff as a unified diff.
    calls = page.locator("#output .tool-call")
    expect(calls).to_have_count(2)
    edit, run = calls.nth(0), calls.nth(1)
    expect(edit.locator(".tool-title")).to_have_text("Write README.md")
    expect(edit.locator(".tool-status")).to_have_text("completed")
    expect(edit.locator(".tool-permission")).to_have_text("Permission: Allow once (policy:auto)")
    diff = edit.locator('.diff[data-path="README.md"]')
    expect(diff.locator(".diff-hunk")).to_have_text("@@ -1,1 +1,2 @@")
    expect(diff.locator(".diff-ctx")).to_have_text(" # test repo")
    expect(diff.locator(".diff-add")).to_have_text(f"+The {nonce} line")
    expect(diff.locator(".diff-del")).to_have_count(0)
    expect(run.locator(".tool-status")).to_have_text("completed")
    expect(run.locator(".tool-output-text")).to_contain_text("M README.md")
    # Messages read as text, the thinking is there but folded away, the plan and the usage are shown.
    expect(page.locator("#output .message").first).to_have_text("I will update the README\n")
    thought = page.locator("#output details.thought")
    expect(thought).not_to_have_attribute("open", "")
    expect(thought.locator(".thought-body")).to_have_text(f"The README needs a line for {nonce}\n")
    expect(page.locator("#plan li")).to_have_text(["Read the README", "Add the line"])
    expect(page.locator("#usage")).to_have_text("1,000 in · 234 out tokens · 0.0123 USD · context 1,200 / 200,000")
    # The timeline stays the flow's handoffs: no row per tool call.
    expect(page.locator('#timeline [data-event^="ToolCall"]')).to_have_count(0)
    if os.environ.get("BATON_SCREENSHOT") == "1":
        page.screenshot(path=str(SCREENSHOT.with_name("task-page-conversation.png")), full_page=True)
