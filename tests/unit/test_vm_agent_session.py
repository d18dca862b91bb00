"""The vm_agent's Session aggregate: what one agent run records."""

from __future__ import annotations

from events import AgentOutput, check_flow, parse_event
from tests.unit.fakes import envelopes_in, popo_store
from vm_agent.domain import Session
from vm_agent.state import end_unfinished_session


def new_session() -> Session:
    return Session("t1", "t1-a1", "shell", cause="ready-1")


def outputs_in(store) -> list[AgentOutput]:
    return [parse_event(e) for e in envelopes_in(store) if e.type == "AgentOutput"]


def test_outputs_are_numbered_one_to_n_contiguously():
    store = popo_store()
    session = new_session()
    session.started("s-1")
    for n in range(5):
        session.output("stdout" if n % 2 else "message", f"line {n}")
    store.save(session)
    outputs = outputs_in(store)
    assert [o.seq for o in outputs] == [1, 2, 3, 4, 5]
    assert [o.text for o in outputs] == [f"line {n}" for n in range(5)]
    assert session.output_count == 5


def test_after_a_rebuild_from_the_store_the_next_output_continues_the_sequence():
    store = popo_store()
    session = new_session()
    session.output("stdout", "a")
    session.output("stdout", "b")
    store.save(session)
    rebuilt = store.get_task_aggregate(Session, "t1")
    assert rebuilt.output_count == 2
    rebuilt.output("stderr", "c")
    store.save(rebuilt)
    assert [(o.seq, o.stream, o.text) for o in outputs_in(store)] == [
        (1, "stdout", "a"), (2, "stdout", "b"), (3, "stderr", "c")
    ]


def test_a_full_session_records_its_handoffs_in_contract_order_with_the_session_id():
    store = popo_store()
    session = new_session()
    session.started("s-9")
    session.prompt_delivered("ab" * 32)
    session.output("message", "done")
    session.finished("end_turn", 0)
    assert not session.ended
    session.pushed("baton/t1", "c0ffee")
    store.save(session)
    envelopes = envelopes_in(store)
    assert [e.type for e in envelopes] == [
        "AgentSessionStarted", "PromptDelivered", "AgentOutput", "AgentFinished", "BranchPushed"
    ]
    assert all(e.causation_id == "ready-1" for e in envelopes)
    assert envelopes[1].data == {"session_id": "s-9", "prompt_sha256": "ab" * 32}
    assert envelopes[0].data == {"session_id": "s-9", "agent": "shell", "attempt_id": "t1-a1"}
    assert [e.actor for e in envelopes] == [
        "vm_agent", "vm_agent", "agent:shell", "agent:shell", "vm_agent"
    ]
    assert check_flow(["TaskSubmitted", "WorkspaceRequested", "WorkspaceReady"]
                      + [e.type for e in envelopes] + ["TaskCompleted"]).ok
    assert store.get_task_aggregate(Session, "t1").ended


def test_a_session_ends_when_the_agent_stops_for_any_reason_but_end_turn():
    session = new_session()
    session.finished("refusal", 7)
    assert session.ended


def test_a_failed_session_is_ended_and_records_its_reason():
    store = popo_store()
    session = new_session()
    session.failed("agent 'shell' could not start: boom")
    store.save(session)
    [failed] = envelopes_in(store)
    assert failed.type == "SessionFailed"
    assert failed.data == {"reason": "agent 'shell' could not start: boom"}
    assert store.get_task_aggregate(Session, "t1").ended


def test_a_lost_vm_agents_session_is_ended_once_and_an_ended_one_is_told_without_a_replay():
    store = popo_store()
    running = Session("t-running", "a1", "shell", None)
    running.started("s1")
    for _ in range(3):
        running.output("stdout", "x")
    done = Session("t-done", "a1", "shell", None)
    done.started("s2")
    done.finished("end_turn", 0)
    done.pushed("baton/t-done", "c0ffee")
    store.save(running, done)

    replays: list[str] = []
    get = store.get_task_aggregate
    store.get_task_aggregate = lambda cls, task_id: replays.append(task_id) or get(cls, task_id)

    assert end_unfinished_session(store, "t-done", reason="gone") is False
    assert replays == [], "an ended session is recognised by its last event alone"
    assert end_unfinished_session(store, "t-running", reason="the vm_agent died") is True
    assert store.last_envelope(Session, "t-running").type == "SessionFailed"
    assert end_unfinished_session(store, "t-running", reason="again") is False


def test_a_line_longer_than_a_piece_is_split_into_contiguous_outputs_joined_by_continues():
    from vm_agent.domain import OUTPUT_PIECE_BYTES

    store = popo_store()
    session = new_session()
    session.output("stdout", "before\n")
    line = ("é✓x" * 200_000)[:500_000] + "\n"  # ~1.2 MB of UTF-8, multi-byte characters at every cut
    assert session.output("stdout", line) > 1
    session.output("stdout", "after\n")
    store.save(session)
    outputs = outputs_in(store)
    assert [o.seq for o in outputs] == list(range(1, len(outputs) + 1))
    pieces = outputs[1:-1]
    # Every piece fits; each but the last says the next one continues it; joined, the line is whole.
    assert all(len(o.text.encode()) <= OUTPUT_PIECE_BYTES for o in pieces)
    assert [o.continues for o in pieces] == [True] * (len(pieces) - 1) + [False]
    assert "".join(o.text for o in pieces) == line
    assert not outputs[0].continues and outputs[-1].text == "after\n"
    assert session.output_count == len(outputs)


def test_a_piece_the_agent_says_continues_keeps_saying_so_on_its_last_output():
    store = popo_store()
    session = new_session()
    session.output("stdout", "x" * 100_000, continues=True)
    session.output("stdout", "end\n")
    store.save(session)
    assert [(len(o.text), o.continues) for o in outputs_in(store)] == [
        (65_536, True), (100_000 - 65_536, True), (4, False)]


def test_pieces_never_cut_a_character_and_short_text_is_one_piece():
    from vm_agent.domain import pieces_of

    assert pieces_of("short") == ["short"]
    for text in ("é" * 10, "✓" * 10, "😀" * 10, "a" + "😀" * 10):
        pieces = pieces_of(text, max_bytes=7)
        assert "".join(pieces) == text
        assert all(0 < len(p.encode()) <= 7 for p in pieces)
