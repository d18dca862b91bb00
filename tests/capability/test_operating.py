"""Operable like the services it runs beside: scraped by Prometheus, grepped as JSON, traced over
OTLP, checked by `baton doctor`.

One stack for the module, started with BATON_LOG_FORMAT=json and an OTLP endpoint (a receiver in
this test); one task through it, from a repo whose URL carries a credential. A second stack, with the
Hetzner provider on the fake API (servers that never boot), for the cloud VMs by state.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.api import Api
from tests.support.fake_hetzner import FakeHetzner
from tests.support.flow import assert_flow_completes
from tests.support.git_http import GitHttpServer, git_http_server
from tests.support.git_remote import make_origin
from tests.support.processes import REPO_ROOT, BatonStack, nats_server_binary, running_stack
from tests.support.waiting import wait_for

pytestmark = pytest.mark.capability
PASSWORD = f"PASS{secrets.token_hex(8)}"


class OtlpReceiver:
    """An OTLP/HTTP traces endpoint on 127.0.0.1: keeps every span it is sent (protobuf, as decoded)."""

    def __init__(self) -> None:
        self.spans: list = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                receiver.spans.extend(span for resource in request.resource_spans
                                      for scope in resource.scope_spans for span in scope.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def spans_of(self, task_id: str) -> list:
        return [span for span in self.spans
                if any(a.key == "baton.task_id" and a.value.string_value == task_id for a in span.attributes)]


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    thread = threading.Thread(target=receiver.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.server.shutdown()
        receiver.server.server_close()


@pytest.fixture(scope="module")
def json_stack(tmp_path_factory: pytest.TempPathFactory, otlp: OtlpReceiver) -> Iterator[BatonStack]:
    # At debug level: the most any process writes (every handled event, libraries' own lines) is
    # what the planted credential must stay out of.
    env = {"BATON_LOG_FORMAT": "json", "BATON_LOG_LEVEL": "debug", "BATON_REPO_SCHEMES": "https,ssh,file,http",
           "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with running_stack(tmp_path_factory.mktemp("operating"), env=env) as stack:
        yield stack


@pytest.fixture(scope="module")
def git_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GitHttpServer]:
    root = tmp_path_factory.mktemp("operating-git")
    make_origin(root)
    with git_http_server(root, username="alice", password=PASSWORD) as server:
        yield server


@pytest.fixture(scope="module")
def completed_task(json_stack: BatonStack, git_server: GitHttpServer) -> dict:
    """One task run to its pushed branch, its repo URL carrying the password; its id."""
    api = Api(json_stack.api, json_stack.token)
    task = api.submit(repo=git_server.url("origin.git", userinfo=f"alice:{PASSWORD}"),
                      prompt='echo "operated" > hello.txt', agent="shell")
    assert_flow_completes(api, task["task_id"], timeout_s=90)
    return task


def scrape(stack: BatonStack) -> dict[tuple[str, tuple], float]:
    """/metrics, parsed by Prometheus's own parser: {(sample name, sorted labels): value}."""
    response = httpx.get(f"{stack.api}/metrics", headers=stack.auth, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(response.text) for s in family.samples}


def test_metrics_are_refused_without_the_token(json_stack: BatonStack):
    response = httpx.get(f"{json_stack.api}/metrics", timeout=10)
    assert response.status_code == 401
    assert "Authorization: Bearer" in response.json()["detail"]


def test_metrics_parse_and_move_after_a_completed_task(json_stack: BatonStack, git_server: GitHttpServer):
    before = scrape(json_stack)
    api = Api(json_stack.api, json_stack.token)
    task = api.submit(repo=git_server.url("origin.git", userinfo=f"alice:{PASSWORD}"),
                      prompt='echo "scraped" > hello.txt', agent="shell")
    assert_flow_completes(api, task["task_id"], timeout_s=90)
    api.wait_for_state(task["task_id"], "completed")
    after = scrape(json_stack)

    def moved(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    # The task board counts one more completed task.
    assert moved("baton_tasks", (("state", "completed"),)) == 1
    # Its prompt's delivery was timed, and each of its handoffs.
    assert moved("baton_task_prompt_delivery_seconds_count", (("agent", "shell"),)) == 1
    handoffs = {labels for name, labels in after if name == "baton_handoff_seconds_count"}
    assert sum(moved("baton_handoff_seconds_count", labels) for labels in handoffs) >= 3, handoffs
    assert moved("baton_events_total", (("type", "TaskCompleted"),)) == 1
    # What holds now is there too: consumers are caught up, nothing was dead-lettered.
    assert ("baton_consumer_lag_events", (("service", "projector"),)) in after
    assert after[("baton_dead_letters", ())] == 0
    assert ("baton_websocket_viewers", ()) in after
    # No task id is a label value.
    assert not any(task["task_id"] in str(labels) for _, labels in after)


RELAYING_SERVICES = ("gateway", "task-runner", "provisioner", "monitor", "notifier", "pull-requests")


def test_every_relaying_services_backlog_is_scraped_and_drains_to_zero_after_a_task(
        json_stack: BatonStack, completed_task: dict):
    def backlogs_once_relayed() -> dict[str, float] | None:
        backlog = {dict(labels)["service"]: value for (name, labels), value in scrape(json_stack).items()
                   if name == "baton_relay_backlog_events"}
        return backlog if set(RELAYING_SERVICES) <= backlog.keys() and not any(backlog.values()) else None

    backlog = wait_for(backlogs_once_relayed, timeout_s=60, every_s=0.5,
                       what="every relaying service's baton_relay_backlog_events, at 0")
    assert set(backlog) == set(RELAYING_SERVICES), backlog


def test_json_logs_parse_line_by_line_and_carry_the_task_id_and_never_the_credential(
        json_stack: BatonStack, completed_task: dict):
    logs = sorted((json_stack.data_dir / "logs").glob("*.log"))
    assert logs, list(json_stack.data_dir.rglob("*.log"))
    lines = [(path.name, line) for path in logs for line in path.read_text().splitlines() if line.strip()]
    records = [(name, json.loads(line)) for name, line in lines]  # every line is one JSON object
    assert all({"time", "level", "service", "message"} <= record.keys() for _, record in records)
    assert any(record.get("task_id") == completed_task["task_id"] for _, record in records)
    # Each consumer's debug line names what it handled, the task's TaskSubmitted among them.
    assert any(record.get("handled_task") == completed_task["task_id"] and record.get("handled_type") == "TaskSubmitted"
               and record["consumer"].startswith("task-runner-p") for _, record in records)
    # The repo URL's password is in no log the stack wrote.
    for path in json_stack.data_dir.rglob("*.log"):
        assert PASSWORD not in path.read_text(errors="replace"), path


def test_doctor_names_a_missing_tool_and_exits_non_zero(tmp_path: Path):
    # A PATH with nats-server and node, but no git.
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "nats-server").symlink_to(nats_server_binary())
    if node := shutil.which("node"):
        (tools / "node").symlink_to(node)
    done = subprocess.run([sys.executable, "-m", "services.cli.main", "doctor", "--data-dir", str(tmp_path / "baton")],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                          env={**os.environ, "PATH": str(tools), "COLUMNS": "200"})
    assert done.returncode == 1, done.stdout + done.stderr
    assert "MISSING  git: not on PATH" in done.stdout
    assert "apt-get install git" in done.stdout
    assert "cannot run here until this is fixed: git" in done.stdout
    # Doctor only looks: it made no data dir.
    assert not (tmp_path / "baton").exists()


def test_a_tasks_spans_form_one_trace_from_the_post_to_the_push(otlp: OtlpReceiver, completed_task: dict):
    task_id = completed_task["task_id"]

    def spans_through_the_push() -> dict | None:
        spans = {span.span_id: span for span in otlp.spans_of(task_id)}
        return spans if {"TaskSubmitted", "BranchPushed", "TaskCompleted"} <= {s.name for s in spans.values()} else None

    spans = wait_for(spans_through_the_push, timeout_s=30, what="the task's spans at the OTLP receiver")
    # One trace: every span of the task carries the same trace id.
    assert len({span.trace_id for span in spans.values()}) == 1
    # The POST's TaskSubmitted is the root; every other span (the push among them) hangs from it
    # through the events that caused it, each span one handoff.
    root = next(span for span in spans.values() if span.name == "TaskSubmitted")
    assert not root.parent_span_id

    def path_to_root(span) -> list[str]:
        path = []
        while span.parent_span_id:
            path.append(span.name)
            span = spans[span.parent_span_id]
        assert span is root, path
        return path

    paths = {span.name: path_to_root(span) for span in spans.values()}
    assert paths["BranchPushed"][-1] == "WorkspaceRequested", paths["BranchPushed"]
    assert "PromptDelivered" in paths


HCLOUD_TOKEN = "hc-operating-test-token-" + "7" * 24
CALL_HOME_TIMEOUT_S = 20


@pytest.fixture(scope="module")
def cloud_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[FakeHetzner, BatonStack]]:
    """A stack with the Hetzner provider on the fake API, whose servers never boot (never call home)."""
    with FakeHetzner(token=HCLOUD_TOKEN) as fake:
        env = {"BATON_HCLOUD_TOKEN": HCLOUD_TOKEN, "BATON_HCLOUD_ENDPOINT": fake.endpoint,
               "BATON_HCLOUD_LOCATIONS": "fsn1", "BATON_VM_NATS_URL": "nats://127.0.0.1:4222",
               "BATON_VM_GATEWAY_URL": "http://127.0.0.1:8420", "BATON_REPO_SCHEMES": "file",
               "BATON_VM_CALL_HOME_TIMEOUT_S": str(CALL_HOME_TIMEOUT_S),
               "BATON_DEADLINES": f"VmAgentConnected={CALL_HOME_TIMEOUT_S * 3}"}
        with running_stack(tmp_path_factory.mktemp("operating-cloud"), env=env) as stack:
            yield fake, stack


def test_cloud_vms_are_scraped_by_provider_and_state_while_they_live(cloud_stack):
    fake, stack = cloud_stack

    def hetzner_vms() -> dict[str, float]:
        return {dict(labels)["state"]: value for (name, labels), value in scrape(stack).items()
                if name == "baton_vms" and dict(labels)["provider"] == "hetzner"}

    api = Api(stack.api, stack.token)
    task_id = api.submit(repo="file:///nowhere.git", prompt="echo hi\n", agent="shell", provider="hetzner")["task_id"]
    # Its server is created and boots (it never calls home here): one VM, created.
    wait_for(lambda: hetzner_vms() == {"requested": 0, "created": 1, "connected": 0}, timeout_s=60,
             every_s=0.5, what="baton_vms{provider=hetzner,state=created} at 1")
    # Its vm_agent never called home: the server is deleted, and no VM is counted any more.
    api.wait_for_end(task_id, timeout_s=CALL_HOME_TIMEOUT_S + 60)
    wait_for(lambda: hetzner_vms() == {"requested": 0, "created": 0, "connected": 0}, timeout_s=30, every_s=0.5,
             what="baton_vms at 0 for hetzner once its server is deleted")
    assert fake.servers() == []
