"""Runs one agent session to its end, recording every step in the vm_agent's store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from services.runtime.relay import pending_envelopes
from services.runtime.store import ServiceStore
from vm_agent.acp_session import AgentProcess, AgentStartError, TurnResult, WorkspaceAccess
from vm_agent.backends import Backend
from vm_agent.domain import Session, TurnEvent
from vm_agent.gitops import PushAccess, PushError, commit_and_push
from vm_agent.permissions import PermissionDesk
from vm_agent.sandbox import WORKSPACE_VIEW, AgentLaunch, Sandbox, SandboxUnavailable
from vm_agent.workspace_files import WorkspaceFiles

log = logging.getLogger(__name__)


OUTPUT_FLUSH_S = 0.02
"""Output is committed at most this long after the agent wrote it…"""
OUTPUT_BATCH_MAX = 500
"""…or once this many lines are waiting."""


def branch_for(task_id: str) -> str:
    return f"baton/{task_id}"


@dataclass(frozen=True)
class AgentLauncher:
    """Starts this vm_agent's agents: in `sandbox`, with `home` as their private home, their
    adapters installed under `agents_dir`."""

    sandbox: Sandbox
    home: Path
    agents_dir: Path

    async def start(self, backend: Backend, *, workspace: Path) -> AgentProcess:
        """`backend`'s agent, started and initialized, working in `workspace`, with its kind's
        environment (declared variables, fixed ones, `prepare`d); raises AgentStartError (also when
        the sandbox is required but cannot be made)."""
        try:
            launch = self.sandbox.launch(backend.command_in(self.agents_dir), workspace=workspace,
                                         home=self.home, env_names=backend.env)
        except SandboxUnavailable as error:
            raise AgentStartError(str(error)) from error
        env = backend.environment(self.home, launch.env)
        return await AgentProcess.start(launch.argv, cwd=launch.cwd, env=env,
                                        session_cwd=launch.workspace_view, offer_workspace=True,
                                        offer_reads=backend.reads_through_client)

    def access(self, backend: Backend, *, workspace: Path) -> WorkspaceAccess:
        """What `backend`'s agent reaches through ACP `fs/*` and `terminal/*`: the files of
        `workspace`, and commands run in the same sandbox, home and environment as the agent."""

        def launch_command(argv: Sequence[str]) -> AgentLaunch:
            launch = self.sandbox.launch(argv, workspace=workspace, home=self.home, env_names=backend.env)
            return replace(launch, env=backend.environment(self.home, launch.env))

        view = WORKSPACE_VIEW if self.sandbox.mode == "bwrap" else workspace
        return WorkspaceAccess(WorkspaceFiles(workspace, view), launch_command)


class SessionRunner:
    """Starts the agent, delivers the prompt, records its output, then pushes the branch.

    It is also the ACP session's sink: each callback is recorded (and so relayed) at once.
    """

    def __init__(
        self,
        store: ServiceStore,
        session: Session,
        *,
        workspace: Path,
        backend: Backend,
        prompt: str,
        faults: frozenset[str],
        launcher: AgentLauncher,
        push_access: PushAccess,
        warm_agent: Awaitable[AgentProcess] | None = None,
        permissions: PermissionDesk | None = None,
        resume_session_id: str | None = None,
    ) -> None:
        self.store = store
        self.session = session
        self.workspace = workspace
        self.backend = backend
        self.prompt = prompt
        self.faults = faults
        self.launcher = launcher
        self.push_access = push_access
        self.warm_agent = warm_agent
        self.permissions = permissions
        self.resume_session_id = resume_session_id
        """The task's earlier ACP session to restore (`session/load`), on a re-provisioned workspace."""
        self._flush: asyncio.TimerHandle | None = None
        self._unsaved_outputs = 0
        self.turn_over = False
        """The agent's turn ended by itself: from then on a cancel is too late (the push follows)."""
        self.cancelling = False
        self.agent: AgentProcess | None = None
        self._follow_ups: asyncio.Queue[str] = asyncio.Queue()

    def follow_up(self, turn: int, prompt: str, cause: str | None) -> str:
        """Run `prompt` as turn `turn` of the session (the task runner's idempotency key): `started`,
        `already` (that turn began before), or why it cannot (`busy`, `gone`, `out_of_order`)."""
        if turn <= self.session.turn:
            return "already"
        if turn != self.session.turn + 1:
            return "out_of_order"
        if not self.session.ended:
            return "busy"
        if self.session.pushed_turn != self.session.turn or self.agent is None or not self.agent.alive:
            return "gone"
        self.session.begin_turn(turn, cause)
        self._save()
        self.turn_over = False
        self._follow_ups.put_nowait(prompt)
        return "started"

    def cancel(self, run: asyncio.Task[None]) -> bool:
        """Stop the agent mid-turn (`run` is this runner's task): ACP `session/cancel`, a short
        grace, then its process group is ended; the session ends AgentFinished `cancelled` and
        nothing is pushed. False if the turn already ended."""
        if self.turn_over or self.session.ended:
            return False
        if not self.cancelling:
            self.cancelling = True
            run.cancel()
        return True

    async def agent_started(self, session_id: str, **restoration: str) -> None:
        self.session.started(session_id, **restoration)
        self._save()

    async def prompt_delivered(self, prompt_sha256: str) -> None:
        self.session.prompt_delivered(prompt_sha256)
        self._save()

    async def output(self, stream: str, text: str, *, continues: bool = False) -> None:
        if "agent_output" in self.faults:
            return  # Rehearsal: the agent's output silently never reaches the bus.
        self._save_soon(self.session.output(stream, text, continues=continues))

    async def report(self, event: TurnEvent) -> None:
        self.session.reported(event)
        self._save_soon(1)  # Batched like output: a tool call streams its updates too.

    def _save_soon(self, recorded: int) -> None:
        """A chatty agent writes thousands of lines a second: commit them in small batches."""
        self._unsaved_outputs += recorded
        if self._unsaved_outputs >= OUTPUT_BATCH_MAX:
            self._save()
        elif self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(OUTPUT_FLUSH_S, self._save)

    def _save(self) -> None:
        """Commit every pending event of the session, in order, in one transaction."""
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        self._unsaved_outputs = 0
        self.store.save(self.session)

    async def run(self) -> None:
        try:
            await self._run()
            # A pushed turn keeps the agent and its session for follow-ups, until the vm_agent exits.
            while self.agent is not None:
                self.prompt = await self._follow_ups.get()
                if self._withholds_prompt():
                    log.warning("fault follow_up_delivery: turn %s not delivered", self.session.turn)
                    continue  # Rehearsal: a follow-up's prompt silently never reaches the agent.
                await self._turn(lambda access, agent=self.agent: agent.run_next_turn(
                    prompt=self.prompt, sink=self, access=access))
        except asyncio.CancelledError:
            if not self.cancelling:
                raise
            # The agent and its process group are gone (the turn's finally below closed them).
            if not self.session.ended:
                self.session.finished("cancelled", None)
                self._save()
        except Exception as error:  # Whatever happens, the task must not hang.
            log.exception("session for %s crashed", self.session.task_id)
            self._fail(f"vm_agent error while running the agent: {error!r}")
        finally:
            await self._close_agent()

    async def _close_agent(self) -> None:
        """The agent and its whole process group (or sandbox) are gone."""
        agent, self.agent = self.agent, None
        if agent is not None:
            await agent.close()

    async def _warm(self) -> AgentProcess | None:
        if self.warm_agent is None:
            return None
        try:
            return await self.warm_agent
        except AgentStartError as error:
            log.warning("the warm agent failed (%s); starting one now", error)
            return None

    async def _agent(self) -> AgentProcess:
        """The agent started ahead of time if it still runs, else one started now."""
        agent = await self._warm()
        if agent is not None and agent.alive:
            return agent
        if agent is not None:
            await agent.close()
        return await self.launcher.start(self.backend, workspace=self.workspace)

    async def _run(self) -> None:
        try:
            self.agent = await self._agent()
        except AgentStartError as error:
            self._fail(f"agent {self.backend.name!r} could not start: {error}")
            return
        await self._turn(lambda access, agent=self.agent: agent.run_prompt(
            cwd=self.workspace, prompt=self.prompt, sink=self,
            deliver_prompt=not self._withholds_prompt(), access=access,
            resume_session_id=self.resume_session_id))

    def _withholds_prompt(self) -> bool:
        """Rehearsal: this turn's prompt silently never reaches the agent (`prompt_delivery`: any
        turn's; `follow_up_delivery`: a follow-up's, on the lingering or a re-provisioned session)."""
        return "prompt_delivery" in self.faults or ("follow_up_delivery" in self.faults and self.session.turn > 1)

    async def _turn(self, play: Callable[[WorkspaceAccess], Awaitable[TurnResult]]) -> None:
        """Play one turn, record how it ended and push its work; the agent stays only after a push."""
        try:
            try:
                result = await play(replace(self.launcher.access(self.backend, workspace=self.workspace),
                                            permissions=self.permissions))
                self.turn_over = not self.cancelling
            finally:
                if self.permissions is not None:
                    self.permissions.close()
        except AgentStartError as error:
            await self._close_agent()
            self._fail(f"agent {self.backend.name!r} could not start: {error}")
            return
        except BaseException:
            await self._close_agent()  # Before AgentFinished `cancelled`: nothing of it runs then.
            raise
        await self._output_relayed()
        self.session.finished(result.stop_reason, result.exit_code)
        self._save()
        if result.stop_reason == "end_turn":
            await self._push()
        if self.session.pushed_turn != self.session.turn:
            await self._close_agent()

    async def _output_relayed(self, *, at_most_s: float = 1.0) -> None:
        """The turn's output is on the bus before its AgentFinished is recorded (waiting at most
        `at_most_s`): consumers of each type (the monitor's) then see the output first, and never
        take a turn that ended as one that skipped its output."""
        self._save()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + at_most_s
        while pending_envelopes(self.store) and loop.time() < deadline:
            await asyncio.sleep(0.01)

    async def _push(self) -> None:
        if "branch_push" in self.faults or ("follow_up_push" in self.faults and self.session.turn > 1):
            log.warning("fault branch_push: not pushing %s", self.session.task_id)
            return
        branch = branch_for(self.session.task_id)
        first_line = self.prompt.strip().splitlines()[0][:60] if self.prompt.strip() else ""
        turn_note = f", turn {self.session.turn}" if self.session.turn > 1 else ""
        try:
            commit = await commit_and_push(
                self.workspace, branch=branch, message=f"baton: {first_line}\n\nTask {self.session.task_id}{turn_note}",
                access=self.push_access,
            )
        except PushError as error:
            self._fail(str(error))
            return
        self.session.pushed(branch, commit)
        self._save()

    def _fail(self, reason: str) -> None:
        if not self.session.ended:
            self.session.failed(reason)
            self._save()
