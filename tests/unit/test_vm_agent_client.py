"""VmAgentClient against a real nats-server: a vm_agent nobody hears is gone (a definite refusal);
one subscribed that never answers is silent (it may have taken the command), which callers must
not mistake for a refusal."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client

from services.runtime.nats_fast_path import flush
from services.runtime.vm_agent_commands import CommandReply, TurnStart, task_address, task_subject
from services.task_runner.vm_agent_client import AgentStartRefused, VmAgentClient, VmAgentSilent
from tests.support.processes import NatsServer

TASK = "t-client"


@pytest.fixture
async def nc(nats_server: NatsServer) -> AsyncIterator[Client]:
    client = await nats.connect(nats_server.url)
    try:
        yield client
    finally:
        await client.close()


async def start_turn_2(client: VmAgentClient) -> None:
    await client.start_turn(task_address(TASK), task_id=TASK, attempt_id=f"{TASK}-a1", turn=2,
                            prompt="echo two", causation_id="f1")


async def test_a_vm_agent_nobody_hears_is_a_definite_refusal_not_silence(nc: Client):
    # Nothing subscribes to the task's subjects: the server says so at once.
    with pytest.raises(AgentStartRefused) as refused:
        await start_turn_2(VmAgentClient(nc, timeout_s=5.0))
    assert not isinstance(refused.value, VmAgentSilent)
    assert "did not answer on the bus" in str(refused.value)


async def test_a_vm_agent_that_hears_the_turn_but_never_answers_is_silent(nc: Client):
    heard: list[TurnStart] = []

    async def take_without_answering(msg) -> None:
        heard.append(TurnStart.model_validate_json(msg.data))

    await nc.subscribe(task_subject(TASK, "turns"), cb=take_without_answering)
    with pytest.raises(VmAgentSilent) as silent:
        await start_turn_2(VmAgentClient(nc, timeout_s=0.5))
    # It got the turn: deciding it was refused would run the turn twice.
    assert [(t.turn, t.prompt) for t in heard] == [(2, "echo two")]
    assert "may have taken it" in str(silent.value)


async def test_a_silence_on_any_retry_stays_silence_though_a_later_ask_finds_nobody(nc: Client):
    heard: list[bytes] = []
    subscription = None

    async def hear_once_then_leave(msg) -> None:
        heard.append(msg.data)
        await subscription.unsubscribe()

    subscription = await nc.subscribe(task_subject(TASK, "sessions"), cb=hear_once_then_leave)
    client = VmAgentClient(nc, attempts=2, timeout_s=0.5)
    with pytest.raises(VmAgentSilent):
        await client.start_agent_with_prompt(task_address(TASK), task_id=TASK, agent="shell", prompt="p",
                                             attempt_id=f"{TASK}-a1", causation_id="r1")
    assert len(heard) == 1


async def test_a_refusal_reply_is_a_definite_refusal_saying_why(nc: Client):
    async def refuse(msg) -> None:
        await msg.respond(CommandReply(status=410, reason="the session ended").model_dump_json().encode())

    await nc.subscribe(task_subject(TASK, "turns"), cb=refuse)
    with pytest.raises(AgentStartRefused) as refused:
        await start_turn_2(VmAgentClient(nc, timeout_s=5.0))
    assert not isinstance(refused.value, VmAgentSilent)
    assert str(refused.value) == "vm_agent refused turn 2 (410): the session ended"


@pytest.mark.parametrize("address", ["http://127.0.0.1:9/", task_address("another-task")],
                         ids=["forged-http-url", "another-task-s-address"])
async def test_a_vm_agent_url_that_is_not_its_task_s_bus_address_is_never_asked(nc: Client, address: str):
    # Issue 11: nothing acts on a vm_agent_url it did not get from the provisioner (a forged
    # WorkspaceReady pointing at a URL, or at another task's vm_agent).
    heard: list[bytes] = []

    async def note(msg) -> None:
        heard.append(msg.data)

    await nc.subscribe("baton.vm.task.*.*", cb=note)
    await flush(nc)
    with pytest.raises(AgentStartRefused) as refused:
        await VmAgentClient(nc, timeout_s=1.0).start_turn(address, task_id=TASK, attempt_id=f"{TASK}-a1",
                                                          turn=2, prompt="echo two", causation_id="f1")
    assert "only talks to a vm_agent over the bus" in str(refused.value)
    assert heard == []
