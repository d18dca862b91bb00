"""Auditors query, export and verify the whole event history."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator

import pytest

from events import FLOW_CONTRACT
from tests.support.api import Api
from tests.support.git_remote import make_origin
from tests.support.processes import BatonStack, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BatonStack, Api, list[str]]]:
    """A stack that ran three tasks (two completed, one failed) and whose audit log caught up."""
    root = tmp_path_factory.mktemp("audit")
    with running_stack(root) as stack:
        api = Api(stack.api, stack.token)
        origin = make_origin(root)
        ids = [api.submit(repo=origin.as_uri(), prompt=f"echo task {n}", agent="shell")["task_id"] for n in (1, 2)]
        ids.append(api.submit(repo=(root / "missing.git").as_uri(), prompt="true", agent="shell")["task_id"])
        for task_id in ids:
            api.wait_for_end(task_id)
            wait_for(lambda t=task_id: len(audit_history(api, t, limit=1000)) == len(api.events(t)),
                     timeout_s=60, what=f"the audit log to hold task {task_id}")
        yield stack, api, ids


def audit_history(api: Api, task_id: str | None = None, *, limit: int, **filters) -> list[dict]:
    """Every page of GET /api/audit/events, following next_cursor."""
    events, cursor = [], None
    while True:
        params = {"limit": limit, **filters, **({"task_id": task_id} if task_id else {})}
        page = api.http.get("/api/audit/events", params={**params, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        events += page.json()["events"]
        if not (cursor := page.json()["next_cursor"]):
            return events


def key(events: list[dict]) -> list[tuple[int, str]]:
    return [(e["stream_seq"], e["event_id"]) for e in events]


def baton(stack: BatonStack, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "BATON_API": stack.api, "BATON_DATA_DIR": str(stack.data_dir),
           "BATON_NATS_URL": stack.nats.url, "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "services.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_each_task_s_audit_history_is_exactly_the_stream_s_across_pages(audited):
    _, api, ids = audited
    for task_id in ids:
        assert key(audit_history(api, task_id, limit=2)) == key(api.events(task_id))
    # Every event says who did it and, but for the user's own submission, why.
    everything = audit_history(api, limit=50)
    assert all(e["actor"] for e in everything)
    assert all(e["causation_id"] for e in everything if e["type"] != "TaskSubmitted")


def test_each_filter_returns_only_what_it_should_and_filters_combine(audited):
    _, api, ids = audited
    everything = audit_history(api, limit=1000)

    submitted = audit_history(api, type="TaskSubmitted", limit=1000)
    assert sorted(e["task_id"] for e in submitted) == sorted(ids)
    assert {e["type"] for e in audit_history(api, actor="user", limit=1000)} == {"TaskSubmitted"}
    assert key(audit_history(api, ids[0], type="AgentOutput", limit=1000)) == key(
        [e for e in everything if e["task_id"] == ids[0] and e["type"] == "AgentOutput"])

    middle = everything[len(everything) // 2]["occurred_at"]
    later = audit_history(api, since=middle, limit=1000)
    earlier = audit_history(api, until=middle, limit=1000)
    assert later and earlier and all(e["occurred_at"] >= middle for e in later)
    assert len(later) + len(earlier) == len(everything)


@pytest.mark.parametrize("params, message", [
    ({"since": "2026-01-01T00:00:00"}, "timezone"),
    ({"since": "yesterday"}, "datetime"),
    ({"limit": 0}, "greater than or equal to 1"),
    ({"type": "Nonsense"}, "unknown event type"),
    ({"cursor": "not-a-cursor"}, "cursor"),
])
def test_bad_audit_parameters_get_a_4xx_with_a_message(audited, params, message):
    _, api, _ = audited
    response = api.http.get("/api/audit/events", params=params)
    assert response.status_code == 422
    assert message in response.text


def test_the_page_size_is_capped(audited):
    _, api, _ = audited
    page = api.http.get("/api/audit/events", params={"limit": 50_000}).json()
    assert len(page["events"]) <= 1000


def test_a_task_s_timeline_lists_its_handoffs_with_times(audited):
    _, api, ids = audited
    timeline = api.http.get(f"/api/audit/tasks/{ids[0]}/timeline").json()
    assert [h["step"] for h in timeline["handoffs"]] == list(FLOW_CONTRACT)
    assert timeline["outcome"] == "TaskCompleted" and timeline["missing"] == []
    failed = api.http.get(f"/api/audit/tasks/{ids[2]}/timeline").json()
    assert failed["outcome"] == "TaskFailed" and "git clone" in failed["reason"]
    assert api.http.get("/api/audit/tasks/nope/timeline").status_code == 404


def test_the_cli_queries_and_exports_the_history(audited):
    stack, api, ids = audited
    csv_out = baton(stack, "audit", "events", "--task", ids[0], "--format", "csv")
    assert csv_out.returncode == 0, csv_out.stderr
    assert len(csv_out.stdout.strip().splitlines()) == 1 + len(api.events(ids[0]))

    exported = baton(stack, "audit", "export")
    assert exported.returncode == 0, exported.stderr
    lines = [json.loads(line) for line in exported.stdout.splitlines()]
    assert key(lines) == key(audit_history(api, limit=1000))

    assert baton(stack, "audit", "gaps").returncode == 0


def test_rebuilding_the_log_gives_byte_identical_answers(audited):
    stack, api, ids = audited
    before = [api.http.get("/api/audit/events", params={"limit": 7}).content,
              api.http.get(f"/api/audit/tasks/{ids[0]}/timeline").content,
              api.http.get("/api/audit/export").content]

    rebuilt = baton(stack, "audit", "rebuild")

    assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
    after = [api.http.get("/api/audit/events", params={"limit": 7}).content,
             api.http.get(f"/api/audit/tasks/{ids[0]}/timeline").content,
             api.http.get("/api/audit/export").content]
    assert after == before


def tamper(stack: BatonStack, sql: str, params: tuple = ()) -> None:
    with sqlite3.connect(stack.data_dir / "projections" / "audit_log.sqlite") as db:
        db.execute(sql, params)


def records(stack: BatonStack) -> list[tuple[int, str, str]]:
    with sqlite3.connect(stack.data_dir / "projections" / "audit_log.sqlite") as db:
        return db.execute("SELECT stream_seq, event_id, envelope FROM audit_log ORDER BY stream_seq").fetchall()


@pytest.fixture
def clean_log(audited):
    stack, _, _ = audited
    assert baton(stack, "audit", "rebuild").returncode == 0
    yield stack
    assert baton(stack, "audit", "rebuild").returncode == 0


def test_verify_passes_on_a_clean_history(clean_log):
    done = baton(clean_log, "audit", "verify")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "hash chain intact" in done.stdout


def test_verify_fails_naming_an_altered_record(clean_log):
    seq, event_id, envelope = records(clean_log)[3]
    tamper(clean_log, "UPDATE audit_log SET envelope = ? WHERE stream_seq = ?",
           (envelope.replace('"actor":"', '"actor":"mallory-'), seq))

    done = baton(clean_log, "audit", "verify")

    assert done.returncode == 1
    assert f"altered: event {event_id}" in done.stdout


def test_verify_fails_naming_a_deleted_record(clean_log):
    seq, event_id, _ = records(clean_log)[2]
    tamper(clean_log, "DELETE FROM audit_log WHERE stream_seq = ?", (seq,))

    done = baton(clean_log, "audit", "verify")

    assert done.returncode == 1
    assert f"missing: event {event_id}" in done.stdout
    assert "broken-chain" in done.stdout


def test_verify_fails_when_the_stream_holds_an_event_the_log_lacks(clean_log):
    seq, event_id, _ = records(clean_log)[-1]
    tamper(clean_log, "DELETE FROM audit_log WHERE stream_seq = ?", (seq,))  # the chain stays whole

    done = baton(clean_log, "audit", "verify")

    assert done.returncode == 1
    assert f"missing: event {event_id} (stream_seq {seq}): on the stream" in done.stdout
    assert "broken-chain" not in done.stdout
