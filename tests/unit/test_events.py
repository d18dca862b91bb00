"""The wire format and the event catalog."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from events import (
    EVENT_TYPES,
    TERMINAL_TYPES,
    AgentFinished,
    AgentOutput,
    Envelope,
    TaskSubmitted,
    envelope_for,
    parse_event,
    subject_for,
    task_subjects,
    type_subjects,
)


def an_envelope(**overrides) -> Envelope:
    fields = dict(
        event_id="e1",
        type="TaskSubmitted",
        task_id="task-1",
        occurred_at=datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
        actor="user:ann",
        causation_id="cause-0",
        data={"repo": "file:///r", "prompt": "héllo", "agent": "shell", "base_branch": None},
    )
    return Envelope(**(fields | overrides))


def test_an_envelope_survives_a_json_round_trip_unchanged():
    original = an_envelope()
    restored = Envelope.from_json(original.to_json())
    assert restored == original
    assert restored.occurred_at == datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    assert restored.data["prompt"] == "héllo"
    assert Envelope.from_json(original.to_json().decode()) == original


def test_an_envelope_gets_a_fresh_event_id_and_a_utc_timestamp_by_default():
    first = Envelope(type="X", task_id="t", actor="a")
    second = Envelope(type="X", task_id="t", actor="a")
    assert first.event_id != second.event_id
    assert len(first.event_id) == 32
    assert first.occurred_at.utcoffset().total_seconds() == 0
    assert first.causation_id is None


def test_an_envelope_is_frozen():
    envelope = an_envelope()
    with pytest.raises(ValidationError):
        envelope.task_id = "other"  # type: ignore[misc]


def test_the_subject_is_baton_task_then_task_id_then_type():
    assert an_envelope().subject == "baton.task.task-1.TaskSubmitted"
    assert subject_for("abc", "TaskFailed") == "baton.task.abc.TaskFailed"
    assert task_subjects("abc") == "baton.task.abc.>"
    assert type_subjects("TaskFailed") == "baton.task.*.TaskFailed.*"


@pytest.mark.parametrize("bad_id", ["a.b", "a b", "*", ">", "a*", "", "x" * 65, "tâche"])
def test_a_task_id_that_is_not_a_single_subject_token_is_rejected(bad_id):
    with pytest.raises(ValidationError, match="task_id must be"):
        an_envelope(task_id=bad_id)


def test_a_task_id_of_64_token_characters_is_accepted():
    assert an_envelope(task_id="A_b-9" * 12 + "abcd").task_id.endswith("abcd")


def test_every_event_class_in_the_catalog_has_a_docstring_and_its_own_name_as_type():
    from events import catalog

    declared = {cls.__name__ for cls in vars(catalog).values()
                if isinstance(cls, type) and issubclass(cls, catalog.BaseEvent) and cls is not catalog.BaseEvent}
    assert declared == set(EVENT_TYPES), "every event class is listed in EVENT_TYPES"
    for name, cls in EVENT_TYPES.items():
        assert cls.__doc__ and cls.__doc__.strip(), f"{name} has no docstring"
        assert cls.type == name == cls.__name__


def test_only_task_completed_task_failed_and_task_cancelled_are_terminal():
    assert TERMINAL_TYPES == {"TaskCompleted", "TaskFailed", "TaskCancelled"}


def test_envelope_for_then_parse_event_gives_back_the_same_event():
    event = TaskSubmitted(repo="file:///r", prompt="do it", agent="shell", base_branch="dev")
    envelope = envelope_for(event, task_id="t1", actor="user:ann", causation_id="c9")
    assert envelope.type == "TaskSubmitted"
    assert envelope.task_id == "t1"
    assert envelope.actor == "user:ann"
    assert envelope.causation_id == "c9"
    assert envelope.data == {
        "repo": "file:///r", "prompt": "do it", "agent": "shell", "base_branch": "dev",
        "permission_policy": "auto",
    }
    assert parse_event(envelope) == event
    assert parse_event(Envelope.from_json(envelope.to_json())) == event


def test_parse_event_raises_key_error_for_an_unknown_type():
    with pytest.raises(KeyError):
        parse_event(an_envelope(type="NoSuchEvent"))


def test_parse_event_rejects_data_with_a_missing_field():
    envelope = an_envelope(type="AgentFinished", data={"exit_code": 1})
    with pytest.raises(ValidationError, match="stop_reason"):
        parse_event(envelope)


def test_events_forbid_unknown_fields():
    with pytest.raises(ValidationError):
        AgentFinished(stop_reason="end_turn", surprise=1)


@pytest.mark.parametrize("seq", [0, -1])
def test_agent_output_seq_below_one_is_rejected(seq):
    with pytest.raises(ValidationError):
        AgentOutput(seq=seq, stream="stdout", text="x")


def test_agent_output_seq_one_and_a_known_stream_are_accepted():
    assert AgentOutput(seq=1, stream="tool", text="x").seq == 1
    with pytest.raises(ValidationError):
        AgentOutput(seq=1, stream="stdlog", text="x")


def test_a_task_submitted_before_permission_policies_existed_is_still_valid_and_auto():
    envelope = Envelope(type="TaskSubmitted", task_id="t1", actor="user",
                        data={"repo": "file:///r", "prompt": "p", "agent": "shell", "base_branch": None})
    assert parse_event(envelope).permission_policy == "auto"
