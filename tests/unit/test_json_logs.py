"""Log lines: JSON objects with BATON_LOG_FORMAT=json, a handled event's ids, never a URL's credential."""

from __future__ import annotations

import io
import json
import logging

import pytest

from services.runtime.logs import HumanFormatter, JsonFormatter, formatter_for, log_context


def logged(formatter: logging.Formatter, message: str, *args: object) -> str:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    logger = logging.getLogger("baton.test.logs")
    logger.handlers[:], logger.propagate = [handler], False
    logger.warning(message, *args)
    return stream.getvalue()


def test_a_json_line_says_time_level_service_and_the_handled_events_ids():
    with log_context(task_id="0123456789abcdef", event_id="ev-1"):
        line = logged(JsonFormatter("provisioner"), "workspace of %s ready", "0123456789abcdef")
    record = json.loads(line)
    assert record["service"] == "provisioner" and record["level"] == "warning"
    assert record["message"] == "workspace of 0123456789abcdef ready"
    assert (record["task_id"], record["event_id"]) == ("0123456789abcdef", "ev-1")
    assert "T" in record["time"]


def test_outside_a_handler_a_line_carries_no_task_id():
    assert "task_id" not in json.loads(logged(JsonFormatter("gateway"), "started"))


@pytest.mark.parametrize("formatter", [JsonFormatter("gateway"), HumanFormatter("gateway")], ids=["json", "human"])
def test_a_credential_in_a_url_never_reaches_a_line(formatter: logging.Formatter):
    line = logged(formatter, "cloning %s", "https://alice:s3cr3t-token@example.com/repo.git")
    assert "s3cr3t-token" not in line and "alice" not in line
    assert "example.com/repo.git" in line


def test_the_format_is_human_unless_json_is_asked_for(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("BATON_LOG_FORMAT", raising=False)
    assert isinstance(formatter_for("gateway"), HumanFormatter)
    monkeypatch.setenv("BATON_LOG_FORMAT", "JSON")
    assert isinstance(formatter_for("gateway"), JsonFormatter)


async def test_a_handled_event_is_one_debug_line_naming_its_consumer_and_stream_seq(caplog: pytest.LogCaptureFixture):
    from services.runtime.consumer import _process
    from tests.unit.fakes import FakeBus, FakeMsg, popo_store
    from events import TaskFailed, envelope_for

    envelope = envelope_for(TaskFailed(reason="r"), task_id="0123456789abcdef", actor="a")

    async def handle(envelope, tracking) -> None: ...

    with caplog.at_level(logging.DEBUG, logger="services.runtime.consumer"):
        await _process(FakeBus(), "svc-p3", FakeMsg(data=envelope.to_json(), stream_seq=42), handle, popo_store())
    [record] = [r for r in caplog.records if r.getMessage().startswith("handled")]
    line = json.loads(JsonFormatter("svc").format(record))
    assert (line["consumer"], line["handled_task"], line["handled_type"], line["stream_seq"]) == (
        "svc-p3", "0123456789abcdef", "TaskFailed", 42)
