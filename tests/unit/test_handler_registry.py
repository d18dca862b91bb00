"""Handlers declared next to their code (`@handles`), read back per instance and per class, and the
one registry of services that the CLI, health and the audit derive their lists from."""

from __future__ import annotations

import sys

import pytest
from eventsourcing.persistence import Tracking

from events import EVENT_TYPES, Envelope, TaskCancelled, TaskFailed, TaskSubmitted, WorkspaceReady
from events.flow import FLOW_CONTRACT, TURN_CONTRACT
from projections.task_board import PROJECTED_TYPES
from services import registry
from services.monitor.handlers import WATCHED_TYPES
from services.notifier.endpoints import NOTIFIABLE_TYPES
from services.runtime.handlers import (
    EVERY_EVENT,
    HandlerDeclarationError,
    declared_handler_names,
    declared_handlers,
    handles,
    handles_every_event,
)


class Runner:
    def __init__(self) -> None:
        self.seen: list[str] = []

    @handles(TaskSubmitted)
    async def on_submitted(self, envelope: Envelope, tracking: Tracking) -> None:
        self.seen.append(envelope.type)

    @handles(TaskFailed, "TaskCancelled")
    async def on_ended(self, envelope: Envelope, tracking: Tracking) -> None:
        self.seen.append(f"ended: {envelope.type}")

    async def not_a_handler(self, envelope: Envelope, tracking: Tracking) -> None:
        raise AssertionError("never declared")


class Unbuildable:
    def __init__(self) -> None:
        raise AssertionError("listing a class's handlers constructs nothing")

    @handles(WorkspaceReady)
    async def on_ready(self, envelope: Envelope, tracking: Tracking) -> None: ...


async def test_an_instance_maps_each_declared_type_to_its_bound_handler():
    runner = Runner()
    found = declared_handlers(runner)
    assert sorted(found) == sorted([TaskSubmitted.type, TaskFailed.type, TaskCancelled.type])
    await found[TaskCancelled.type](Envelope(type="TaskCancelled", task_id="t", actor="test", data={}),
                                    Tracking("x", 1))
    assert runner.seen == ["ended: TaskCancelled"]


def test_a_class_lists_its_handlers_by_qualified_name_without_being_constructed():
    assert declared_handler_names(Unbuildable) == {"WorkspaceReady": "Unbuildable.on_ready"}
    assert declared_handler_names(Runner)[TaskFailed.type] == "Runner.on_ended"


def test_two_handlers_of_one_class_claiming_one_type_is_an_error_naming_both():
    class Twice:
        @handles(TaskSubmitted)
        async def first(self, envelope: Envelope, tracking: Tracking) -> None: ...

        @handles("TaskSubmitted")
        async def second(self, envelope: Envelope, tracking: Tracking) -> None: ...

    for read in (lambda: declared_handler_names(Twice), lambda: declared_handlers(Twice())):
        with pytest.raises(HandlerDeclarationError, match="TaskSubmitted is claimed by both first and second"):
            read()


def test_a_declaration_names_a_known_event_and_an_async_handler():
    with pytest.raises(HandlerDeclarationError, match="not an event"):
        handles("TaskSubmited")
    with pytest.raises(HandlerDeclarationError, match="names no event"):
        handles()
    with pytest.raises(HandlerDeclarationError, match="not `async def`"):
        @handles(TaskSubmitted)
        def sync(envelope: Envelope, tracking: Tracking) -> None: ...


def test_a_subclass_keeps_inherited_declarations_and_an_override_declares_afresh():
    class Quiet(Runner):
        async def on_ended(self, envelope: Envelope, tracking: Tracking) -> None: ...  # No longer a handler.

    class Louder(Runner):
        @handles(TaskCancelled)
        async def on_ended(self, envelope: Envelope, tracking: Tracking) -> None: ...

    assert declared_handler_names(Quiet) == {"TaskSubmitted": "Runner.on_submitted"}
    louder = declared_handler_names(Louder)
    assert set(louder) == {"TaskSubmitted", "TaskCancelled"}
    assert louder["TaskSubmitted"] == "Runner.on_submitted" and louder["TaskCancelled"].endswith("Louder.on_ended")


def test_every_event_is_declared_under_its_own_key():
    class Audit:
        @handles_every_event
        async def keep(self, envelope: Envelope, tracking: Tracking) -> None: ...

    assert list(declared_handlers(Audit())) == [EVERY_EVENT]


@handles(TaskSubmitted)
async def module_level_handler(envelope: Envelope, tracking: Tracking) -> None: ...


def test_a_module_of_declared_functions_is_read_like_an_instance():
    assert declared_handlers(sys.modules[__name__]) == {"TaskSubmitted": module_level_handler}


def test_each_service_declares_what_it_handled_before():
    handled = {entry.name: declared_handler_names(cls) for entry in registry.SERVICES
               if (cls := entry.handler_class()) is not None}
    assert set(handled) == set(registry.SERVICE_NAMES) - {"gateway"}
    assert set(handled["monitor"]) == set(WATCHED_TYPES)
    assert set(handled["notifier"]) == set(NOTIFIABLE_TYPES)
    assert handled["pull-requests"] == {"TaskCompleted": "PullRequests.on_task_completed"}
    assert handled["provisioner"] == {"WorkspaceRequested": "ProvisionerHandlers.on_workspace_requested",
                                      "TaskFailed": "ProvisionerHandlers.on_task_ended",
                                      "TaskCancelled": "ProvisionerHandlers.on_task_ended"}
    assert set(handled["task-runner"]) == {
        "TaskSubmitted", "WorkspaceReady", "WorkspaceFailed", "SessionFailed", "AgentFinished", "BranchPushed",
        "StepOverdue", "PermissionAnswerGiven", "TaskCancelRequested", "FollowUpSubmitted", "WorkspaceReleased"}
    assert handled["projector"] == {**{t: "Projector.project" for t in PROJECTED_TYPES},
                                    EVERY_EVENT: "Projector.append_to_audit_log"}


def test_every_handoff_of_the_flow_has_a_service_acting_on_it():
    declared = {t for entry in registry.SERVICES if (cls := entry.handler_class())
                for t in declared_handler_names(cls)}
    assert set(FLOW_CONTRACT) | set(TURN_CONTRACT) <= declared
    assert declared - {EVERY_EVENT} <= set(EVENT_TYPES)


def test_the_lists_of_services_are_derived_from_the_registry():
    from services.cli.service import SERVICE_MODULES
    from services.cli.supervisor import SERVICE_NAMES
    from services.projector.audit_sources import PRODUCERS
    from services.runtime.heartbeat import REQUIRED_SERVICES

    assert SERVICE_NAMES == ("gateway", "task-runner", "provisioner", "projector", "monitor", "notifier",
                             "pull-requests")
    assert SERVICE_MODULES == {entry.name: entry.module for entry in registry.SERVICES}
    assert REQUIRED_SERVICES == SERVICE_NAMES
    assert PRODUCERS == tuple(name for name in SERVICE_NAMES if name != "projector")
    assert registry.service_named("monitor").module == "services.monitor.main"
    with pytest.raises(KeyError, match="one of gateway, task-runner"):
        registry.service_named("nobody")
