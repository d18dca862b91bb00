"""One service's process: `python -m services.cli.service NAME` (what `baton up` starts, and
`baton service NAME`). It imports the service and what runs it, not the command line's own
libraries: a stack starts eight of these, and each import costs CPU at every start."""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from services import registry
from services.cli.data_dir_processes import (
    STOP_DEADLINE_S, SUPERVISOR_PID_ENV, die_with_parent, stop_data_dir_processes,
)
from services.runtime.logs import setup_logging
from services.runtime.settings import Settings
from services.runtime.watchdog import feed_watchdog

SERVICE_MODULES = {entry.name: entry.module for entry in registry.SERVICES}
SERVICE_STOP_GRACE_S = 3.0
"""After SIGTERM, how long a service's own shutdown may run before it exits regardless (its
effects are committed with their positions: ending it is as safe as a crash, which Baton handles)."""


def run_service(name: str) -> None:
    """Run one service in the foreground until it is stopped (`baton up` runs each this way)."""
    if name not in SERVICE_MODULES:
        raise SystemExit(f"unknown service {name!r}; one of {', '.join(SERVICE_MODULES)}")
    stopper = _ServiceStopper(name)
    setup_logging(name)
    module = importlib.import_module(SERVICE_MODULES[name])

    async def main() -> None:
        stopper.attach(asyncio.get_running_loop(), asyncio.current_task())
        alive = asyncio.create_task(feed_watchdog())  # Pings from this loop while it turns.
        try:
            await module.run(Settings())
        finally:
            alive.cancel()

    try:
        asyncio.run(main())
    except (asyncio.CancelledError, KeyboardInterrupt):
        pass
    finally:
        stopper.finish()
    if stopper.signum is not None:
        # Asked to stop and stopped: skip the interpreter's teardown, whose garbage collection of
        # a big heap takes seconds on a loaded machine (with every other thread frozen).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


class _ServiceStopper:
    """How a service stops: promptly on SIGTERM, and with `baton up` when that dies.

    SIGTERM (or SIGHUP: the kernel's word that `baton up` died, PR_SET_PDEATHSIG) cancels the
    service's main task; its shutdown gets SERVICE_STOP_GRACE_S, then the process exits
    regardless (a busy WebSocket or a slow close must not hold a stop: every effect is committed
    with its position, so this is no worse than a crash). A thread keeps that deadline, so it
    holds even while the event loop is busy. Under `baton up` (BATON_SUPERVISOR_PID set) the same
    thread also notices a parent that is gone without a signal (not Linux, or it died before the
    request), and an orphaned provisioner stops the vm_agents, as `baton up` would have.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.requested = threading.Event()
        self.swept = threading.Event()
        self.signum: int | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task | None = None
        supervisor = os.environ.get(SUPERVISOR_PID_ENV, "")
        self.supervisor_pid = int(supervisor) if supervisor.isdigit() else None
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._on_signal)
        if self.supervisor_pid is not None:
            die_with_parent(signal.SIGHUP)
            if os.getppid() != self.supervisor_pid:  # It died before we asked.
                raise SystemExit(f"{name}: `baton up` (pid {self.supervisor_pid}) is gone")
        threading.Thread(target=self._keep_deadline, name="stopper", daemon=True).start()

    @property
    def sweeps(self) -> bool:
        """An orphaned provisioner stops the vm_agents (and whatever else of the data dir runs)."""
        return self.signum == signal.SIGHUP and self.name == "provisioner" and self.supervisor_pid is not None

    def attach(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task | None) -> None:
        self.loop, self.task = loop, task
        for signum in (signal.SIGTERM, signal.SIGHUP):
            # Through the loop's wakeup fd as well: that still fires while a library (uvicorn)
            # has put its own Python-level handler in place of ours.
            loop.add_signal_handler(signum, self._request, signum)
            signal.signal(signum, self._on_signal)
        if self.signum is not None:
            self._cancel()

    def finish(self) -> None:
        """The service's main task is over: wait for an orphan sweep before the process ends."""
        if self.sweeps:
            self.swept.wait(STOP_DEADLINE_S + 10.0)

    def _on_signal(self, signum: int, _frame: object) -> None:
        self._request(signum)

    def _request(self, signum: int) -> None:
        if self.signum is not None:
            return
        self.signum = signum
        self.requested.set()
        if self.loop is None:
            raise SystemExit(0)  # Not serving yet: nothing to shut down.
        self._cancel()

    def _cancel(self) -> None:
        if self.loop is not None and self.task is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.task.cancel)

    def _keep_deadline(self) -> None:
        log = logging.getLogger("baton.service")
        while not self.requested.wait(1.0):
            if self.supervisor_pid is not None and os.getppid() != self.supervisor_pid:
                os.kill(os.getpid(), signal.SIGHUP)  # Handled like the kernel's SIGHUP.
        deadline = time.monotonic() + SERVICE_STOP_GRACE_S
        assert self.signum is not None
        log.info("%s: stopping (%s)", self.name,
                 "`baton up` is gone" if self.signum == signal.SIGHUP else signal.Signals(self.signum).name)
        if self.sweeps:
            try:
                found, killed = stop_data_dir_processes(Path(os.environ["BATON_DATA_DIR"]))
                log.warning("provisioner: `baton up` is gone; stopped %d processes of its data dir "
                            "(%d with SIGKILL)", found, killed)
            finally:
                self.swept.set()
        time.sleep(max(deadline - time.monotonic(), 0.0))
        log.warning("%s: still stopping %.0fs after the signal; exiting now. Still running:\n%s",
                    self.name, SERVICE_STOP_GRACE_S, self._still_running())
        os._exit(0)

    def _still_running(self) -> str:
        """Each unfinished task's await chain (read from this thread: a best effort, for the log)."""
        try:
            tasks = list(asyncio.all_tasks(self.loop)) if self.loop is not None else []
        except RuntimeError:
            return "  (could not list the tasks)"
        lines = []
        for task in tasks[:20]:
            chain, awaited = [], task.get_coro()
            while awaited is not None and len(chain) < 15:
                frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
                if frame is not None:
                    chain.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
                awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
            lines.append(f"  {task.get_name()}: {' > '.join(chain) or task!r}")
        return "\n".join(lines) or "  (no task: the interpreter's own teardown)"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m services.cli.service NAME ({', '.join(SERVICE_MODULES)})")
    run_service(sys.argv[1])
