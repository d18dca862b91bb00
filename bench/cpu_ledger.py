"""Where a benchmark's CPU goes, by kind of process: the profile behind "what one task costs".

`CpuLedger` samples, every `every_s` in a thread, every process of one run (its environment
carries the run's BATON_DATA_DIR, as `bench.stack.started_by_this_run` finds them, plus the
run's nats-server) and keeps, per pid, its own CPU (utime + stime) and its waited-for
children's (cutime + cstime), from /proc/<pid>/stat. A process seen alive is charged to its
own kind (`kind_of`); what a parent's children-time grew by beyond the children it was seen
with is charged to "<parent kind> children (short-lived)": the git, bash and bwrap processes
that start and end between two samples. CPU a process spends after its last sample is lost
(at most `every_s` each), so the totals are a slight undercount.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from bench import procfs
from bench.stack import started_by_this_run



@dataclass
class _Seen:
    kind: str
    ppid: int
    own: float
    children: float
    own_at_start: float
    children_at_start: float


def kind_of(pid: int) -> str:
    """A process's kind: a service by name, the vm_agent, the shell agent, git, bash, …"""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "gone"
    args = [a.decode(errors="replace") for a in argv if a]
    if comm == "baton-vm_agent":
        return "vm_agent"
    if "services.cli.service" in args:
        return args[args.index("services.cli.service") + 1]
    if "up" in args and "services.cli.main" in args:
        return "baton up"
    for module in ("vm_agent.zygote", "vm_agent.agents.shell"):
        if module in args:
            return module.rsplit(".", 1)[1] + (" agent" if module.endswith("shell") else "")
    name = Path(args[0]).name if args else comm
    return {"python": comm, "python3": comm}.get(name, name)


def busy_s() -> float:
    """The whole machine's busy CPU time so far (every CPU), from /proc/stat."""
    user, nice, system, _idle, _iowait, irq, softirq, steal, *_ = (
        int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:])
    return (user + nice + system + irq + softirq + steal) / procfs.TICKS


class CpuLedger:
    def __init__(self, data_dir: Path, *, nats_pid: int | None = None, every_s: float = 0.1) -> None:
        self._data_dir, self._nats_pid, self._every_s = data_dir, nats_pid, every_s
        self._seen: dict[int, _Seen] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-ledger", daemon=True)
        self._busy_at_start = 0.0
        self.machine_busy_s = 0.0

    def __enter__(self) -> CpuLedger:
        self._sample(at_start=True)
        self._busy_at_start = busy_s()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample(at_start=False)
        self.machine_busy_s = busy_s() - self._busy_at_start

    def _run(self) -> None:
        while not self._stop.wait(self._every_s):
            self._sample(at_start=False)

    def _sample(self, *, at_start: bool) -> None:
        pids = started_by_this_run(self._data_dir) + ([self._nats_pid] if self._nats_pid else [])
        for pid in pids:
            found = procfs.stat(pid)
            if found is None:
                continue
            ppid, own, children = found.ppid, found.cpu_s, found.children_cpu_s
            seen = self._seen.get(pid)
            if seen is None:
                self._seen[pid] = _Seen(kind_of(pid), ppid, own, children,
                                        own if at_start else 0.0, children if at_start else 0.0)
            else:
                seen.own, seen.children = own, children

    def by_kind(self) -> dict[str, float]:
        """CPU seconds spent during the ledger, by kind of process (see the module's doc)."""
        spent: dict[str, float] = defaultdict(float)
        seen_children: dict[int, float] = defaultdict(float)
        for pid, seen in self._seen.items():
            spent[seen.kind] += seen.own - seen.own_at_start
            if seen.own_at_start == 0.0 and not Path(f"/proc/{pid}").exists():  # Reaped by its parent.
                seen_children[seen.ppid] += seen.own + seen.children
        for pid, seen in self._seen.items():
            unseen = (seen.children - seen.children_at_start) - seen_children.get(pid, 0.0)
            if unseen > 0.005:
                spent[f"{seen.kind} children (short-lived)"] += unseen
        return dict(sorted(((k, round(v, 2)) for k, v in spent.items() if v > 0.005), key=lambda kv: -kv[1]))
