"""Notifications end to end: webhook receivers (JSON and Slack-shaped) get each subscribed event
once, signed, also when they fail their first attempts and when the notifier is killed mid-delivery;
`baton notifications` and the API list the outcomes; no secret reaches an event or a log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from services.notifier.messages import DELIVERY_HEADER, SIGNATURE_HEADER, is_signed_by
from tests.support.api import Api
from tests.support.git_remote import make_origin
from tests.support.processes import running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability

SECRETS = {"team": "team-signing-key-7f3a", "flaky": "flaky-signing-key-91c2", "slow": "slow-signing-key-4d8e",
           "slack": "slack-signing-key-0b5f"}
URL_TOKEN = "T0DEADBEEF/B0CAFE/url-credential-2a9c"
"""The secret part of a Slack-style webhook URL (its path): never in an event or a log either."""


@dataclass
class Hook:
    """What one receiver path does: fail its first `fail_first` requests (500), hold its first
    request until `release` is set, and accept only Slack's `{"text": …}` form if `slack`."""

    fail_first: int = 0
    hold_first: bool = False
    slack: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    held: threading.Event = field(default_factory=threading.Event)
    seen: int = 0
    accepted: list[tuple[dict, bytes, dict]] = field(default_factory=list)
    """(body, raw bytes, headers) of each request answered 200."""


@contextmanager
def webhook_receiver(hooks: dict[str, Hook]):
    """A local HTTP server answering POST /<name>/<URL_TOKEN> as hook `name` says."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            name = self.path.strip("/").split("/", 1)[0]
            hook = hooks[name]
            raw = self.rfile.read(int(self.headers["Content-Length"]))
            hook.seen += 1
            if hook.hold_first and hook.seen == 1:
                hook.held.set()
                hook.release.wait(60)  # The notifier is killed meanwhile: this answer goes nowhere.
                self._answer(200, b"ok")
                return
            if hook.seen <= hook.fail_first:
                self._answer(500, b"not now")
                return
            body = json.loads(raw)
            if hook.slack and (set(body) != {"text"} or not isinstance(body["text"], str)):
                self._answer(400, b"invalid_payload")  # As Slack answers a malformed message.
                return
            hook.accepted.append((body, raw, dict(self.headers)))
            self._answer(200, b"ok")

        def _answer(self, status: int, text: bytes) -> None:
            try:
                self.send_response(status)
                self.send_header("Content-Length", str(len(text)))
                self.end_headers()
                self.wfile.write(text)
            except OSError:
                pass  # The notifier hung up (killed).

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        for hook in hooks.values():
            hook.release.set()
        server.shutdown()
        server.server_close()


def endpoints_config(base: str) -> str:
    def endpoint(name: str, events: list[str], form: str = "json") -> dict:
        return {"name": name, "url": f"{base}/{name}/{URL_TOKEN}", "events": events, "format": form,
                "secret": SECRETS[name]}
    return json.dumps([endpoint("team", ["TaskCompleted", "TaskFailed"]),
                       endpoint("flaky", ["TaskCompleted"]),
                       endpoint("slow", ["TaskCompleted"]),
                       endpoint("slack", ["TaskCompleted", "TaskFailed"], form="slack")])


def baton(stack, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BATON_API": stack.api, "BATON_DATA_DIR": str(stack.data_dir), "COLUMNS": "250"}
    env.pop("BATON_API_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_each_subscribed_event_reaches_each_endpoint_once_signed_through_failures_and_a_killed_notifier(
        tmp_path: Path):
    hooks = {"team": Hook(), "flaky": Hook(fail_first=2), "slow": Hook(hold_first=True), "slack": Hook(slack=True)}
    with webhook_receiver(hooks) as base, running_stack(tmp_path / "stack", env={
            "BATON_NOTIFY_WEBHOOKS": endpoints_config(base), "BATON_NOTIFY_BACKOFF_S": "0.3",
            "BATON_PUBLIC_URL": "https://baton.example.com"}) as stack:
        api = Api(stack.api, stack.token)
        origin = make_origin(tmp_path)
        done = api.submit(repo=origin.as_uri(), agent="shell", prompt="echo hi > hi.txt\n")["task_id"]
        failed = api.submit(repo=(tmp_path / "no-such-repo.git").as_uri(), agent="shell", prompt="echo\n")["task_id"]
        completed = api.wait_for_end(done, timeout_s=90)[-1]
        assert completed["type"] == "TaskCompleted"
        failure = api.wait_for_end(failed, timeout_s=90)[-1]
        assert failure["type"] == "TaskFailed"

        # The slow receiver holds the notifier's first POST: the notifier is killed -9 mid-delivery.
        assert hooks["slow"].held.wait(60), "the slow receiver never got the notification"
        stack.kill_service("notifier")
        hooks["slow"].release.set()

        # Every endpoint ends up with each event it wants, exactly once in Baton's record.
        wanted = {("team", completed["event_id"]), ("team", failure["event_id"]), ("flaky", completed["event_id"]),
                  ("slow", completed["event_id"]), ("slack", completed["event_id"]), ("slack", failure["event_id"])}

        def delivered() -> list[dict] | None:
            found = api.http.get("/api/notifications").json()["notifications"]
            return found if {(n["endpoint"], n["event_id"]) for n in found} >= wanted else None

        outcomes = wait_for(delivered, timeout_s=60, what="every notification delivered")
        assert Counter((n["endpoint"], n["event_id"]) for n in outcomes) == Counter(wanted)
        assert {n["outcome"] for n in outcomes} == {"delivered"}
        attempts = {(n["endpoint"], n["event_id"]): n["attempts"] for n in outcomes}
        # Two 500s, then taken; an attempt the kill cut off before it was recorded is not counted.
        assert hooks["flaky"].seen == 3 and attempts[("flaky", completed["event_id"])] in (2, 3)

        # Each receiver got each of its events, signed with its own secret, once per delivery id.
        # A POST the kill cut off after the receiver took it and before the notifier recorded it is
        # sent again after the restart under the same delivery id (at-least-once: receivers dedupe
        # on X-Baton-Delivery, as README says): the slow one's always, another's if it was in flight.
        for name, hook in hooks.items():
            by_id = {headers[DELIVERY_HEADER]: body for body, _, headers in hook.accepted}
            got = list(by_id.values())
            for body, raw, headers in hook.accepted:
                assert is_signed_by(SECRETS[name], raw, headers[SIGNATURE_HEADER]), name
            repeats = Counter(headers[DELIVERY_HEADER] for _, _, headers in hook.accepted)
            assert max(repeats.values()) <= 2, f"{name} got a delivery more than twice: {repeats}"
            expected = sorted(e for endpoint, e in wanted if endpoint == name)
            if hook.slack:
                assert len(got) == len(expected) and all(set(b) == {"text"} for b in got)
                assert any(f"<https://baton.example.com/tasks/{done}|{done}> :white_check_mark: completed" in b["text"]
                           for b in got)
            else:
                assert sorted(b["event_id"] for b in got) == expected
        slow_ids = {headers[DELIVERY_HEADER] for _, _, headers in hooks["slow"].accepted}
        assert hooks["slow"].seen == 2 and len(slow_ids) == 1
        team = {b["event_type"]: b for b, _, _ in hooks["team"].accepted}
        assert team["TaskCompleted"]["branch"] == f"baton/{done}" and team["TaskCompleted"]["repo"] == origin.as_uri()
        assert team["TaskCompleted"]["link"] == f"https://baton.example.com/tasks/{done}"
        assert team["TaskFailed"]["state"] == "failed" and team["TaskFailed"]["reason"]

        # `baton notifications` lists them.
        listed = baton(stack, "notifications")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        for name in hooks:
            assert name in listed.stdout
        assert done in listed.stdout and failed in listed.stdout and "delivered" in listed.stdout

        # No secret, and no webhook URL, in any event or log.
        history = json.dumps(api.http.get("/api/audit/events", params={"limit": 1000}).json())
        logs = stack.logs() + "".join(p.read_text(errors="replace") for p in stack.data_dir.rglob("*.log"))
        for text in (history, logs):
            for secret in (*SECRETS.values(), URL_TOKEN):
                assert secret not in text
        assert "NotificationDelivered" in history
        # Nor in any file the stack wrote: stores, logs, the stream's own files.
        for path in (tmp_path / "stack").rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(secret.encode() in data for secret in (*SECRETS.values(), URL_TOKEN)), path


def test_a_task_waiting_for_a_person_and_its_cancel_are_told_but_a_request_the_policy_answers_is_not(
        tmp_path: Path):
    hooks = {"team": Hook()}
    with webhook_receiver(hooks) as base, running_stack(tmp_path / "stack", env={
            "BATON_TEST_AGENT_KINDS": "scripted", "BATON_PERMISSION_TIMEOUT_S": "120",
            "BATON_NOTIFY_WEBHOOKS": json.dumps([{
                "name": "team", "url": f"{base}/team/{URL_TOKEN}", "secret": SECRETS["team"],
                "events": ["PermissionRequested", "TaskCancelled", "TaskCompleted"]}])}) as stack:
        api = Api(stack.api, stack.token)
        origin = make_origin(tmp_path)
        # Under `auto` the agent's request is answered at once: only the completion is told.
        auto = api.submit(repo=origin.as_uri(), agent="scripted", prompt="write auto.txt yes\nsay wrote it\n")["task_id"]
        ended = api.wait_for_end(auto, timeout_s=90)[-1]
        assert ended["type"] == "TaskCompleted", ended["data"]
        # Under `ask` the task waits for a person: that is told, and so is its cancel.
        asked = api.submit(repo=origin.as_uri(), agent="scripted", prompt="write asked.txt yes\nsay wrote it\n",
                           permission_policy="ask")["task_id"]

        def told(task_id: str, event_type: str) -> dict | None:
            return next((b for b, _, _ in hooks["team"].accepted
                         if b["task_id"] == task_id and b["event_type"] == event_type), None)

        waiting = wait_for(lambda: told(asked, "PermissionRequested"), timeout_s=90, what="the wait to be told")
        assert waiting["state"] == "waiting_for_permission" and waiting["reason"]
        assert api.http.post(f"/api/tasks/{asked}/cancel").status_code == 202
        cancelled = wait_for(lambda: told(asked, "TaskCancelled"), timeout_s=60, what="the cancel to be told")
        assert cancelled["state"] == "cancelled"
        wait_for(lambda: told(auto, "TaskCompleted"), timeout_s=60, what="the completion to be told")

        # Nothing is left to deliver, and the auto task's request was never posted.
        wait_for(lambda: api.http.get("/api/health").json()["details"]["notifier"]["pending"] == 0,
                 timeout_s=30, what="the notifier's outbox to be empty")
        assert [b["event_type"] for b, _, _ in hooks["team"].accepted if b["task_id"] == auto] == ["TaskCompleted"]
        assert len(hooks["team"].accepted) == 3
