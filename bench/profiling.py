"""Optional: py-spy attached to Baton's processes while a benchmark runs (`bench/run.py --profile DIR`).

Each profiler writes a speedscope file (`DIR/<name>.speedscope.json`); `summarize` turns one into
the top functions by own and by inclusive time, which is what docs/benchmarks.md quotes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench.stack import Stack, log


def py_spy() -> str | None:
    local = Path(sys.executable).with_name("py-spy")
    return str(local) if local.exists() else shutil.which("py-spy")


class Profilers:
    """py-spy record on Baton's services and, once it runs, a task's vm_agent (with its agent).

    Files are named `<prefix>-<process>.speedscope.json`.
    """

    def __init__(self, stack: Stack, out_dir: Path, *, prefix: str,
                 services: tuple[str, ...] = ("gateway", "projector", "monitor"), rate: int = 200) -> None:
        self._stack = stack
        self._out = out_dir
        self._prefix = prefix
        self._services = services
        self._rate = rate
        self._procs: dict[str, subprocess.Popen] = {}
        self._watch: asyncio.Task[None] | None = None
        self.files: dict[str, Path] = {}

    def _attach(self, name: str, pid: int, *, subprocesses: bool = False) -> None:
        binary = py_spy()
        if binary is None or name in self._procs:
            return
        path = self._out / f"{self._prefix}-{name}.speedscope.json"
        argv = [binary, "record", "--pid", str(pid), "--rate", str(self._rate), "--format", "speedscope",
                "--output", str(path), "--nonblocking"]
        if subprocesses:
            argv.append("--subprocesses")
        self._procs[name] = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.files[name] = path
        log(f"profiling {name} (pid {pid}) -> {path}")

    def start(self) -> None:
        self._out.mkdir(parents=True, exist_ok=True)
        if py_spy() is None:
            log("py-spy not found (.venv/bin/pip install py-spy); not profiling")
            return
        for service in self._services:
            pid = self._stack.pid(service)
            if pid:
                self._attach(service, pid)

    def follow_task(self, task_id: str) -> None:
        """Attach to the task's vm_agent as soon as the provisioner has started it."""
        async def wait_and_attach() -> None:
            for _ in range(600):  # Bounded: 60 s.
                pid = self._stack.vm_agent_pid(task_id)
                if pid:
                    self._attach("vm_agent", pid, subprocesses=True)
                    return
                await asyncio.sleep(0.1)

        self._watch = asyncio.create_task(wait_and_attach())

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        for name, proc in self._procs.items():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if not self.files[name].exists():
                err = (proc.stderr.read() if proc.stderr else b"").decode(errors="replace")[-500:]
                log(f"py-spy for {name} wrote nothing: {err}")


def summarize(path: Path, *, top: int = 15) -> dict[str, Any]:
    """Top frames of a py-spy speedscope profile, per thread: % of its on-CPU time spent in each
    function itself ("own") and in it or anything it called ("inclusive")."""
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]

    def label(i: int) -> str:
        f = frames[i]
        file = f.get("file") or "?"
        for marker in ("/work/main/", "site-packages/", "/lib/python3.11/"):
            if marker in file:
                file = file.split(marker, 1)[1]
                break
        return f"{file}:{f.get('name', '?')}"

    out: dict[str, Any] = {}
    for profile in doc["profiles"]:
        own: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        total = 0
        for sample, weight in zip(profile["samples"], profile["weights"], strict=False):
            total += weight
            if sample:
                own[label(sample[-1])] += weight
            for name in {label(i) for i in sample}:
                inclusive[name] += weight
        if total == 0:
            continue
        out[profile.get("name", "?")] = {
            "seconds": round(total, 3),
            "own": [(name, round(100 * n / total, 1)) for name, n in own.most_common(top)],
            "inclusive": [(name, round(100 * n / total, 1)) for name, n in inclusive.most_common(top * 2)],
        }
    return out


def callers(path: Path, function: str, *, depth: int = 4, top: int = 10) -> list[tuple[str, float]]:
    """Who calls `function` (by name), `depth` frames up, with the CPU seconds spent below it."""
    doc = json.loads(path.read_text())
    frames = doc["shared"]["frames"]
    chains: Counter[str] = Counter()
    for profile in doc["profiles"]:
        for sample, weight in zip(profile["samples"], profile["weights"], strict=False):
            names = [frames[i].get("name", "?") for i in sample]
            if function in names:
                at = names.index(function)
                chains[" < ".join([function, *reversed(names[max(0, at - depth):at])])] += weight
    return [(chain, round(seconds, 3)) for chain, seconds in chains.most_common(top)]


if __name__ == "__main__":
    # python -m bench.profiling FILE.speedscope.json [TOP]          top functions
    # python -m bench.profiling FILE.speedscope.json --callers NAME  who calls NAME
    if len(sys.argv) > 3 and sys.argv[2] == "--callers":
        for chain, seconds in callers(Path(sys.argv[1]), sys.argv[3], depth=6):
            print(f"{seconds:8.3f}s  {chain}")
        raise SystemExit(0)
    result = summarize(Path(sys.argv[1]), top=int(sys.argv[2]) if len(sys.argv) > 2 else 15)
    for name, data in result.items():
        print(f"== {name}: {data['seconds']} s on CPU")
        print("  own:")
        for frame, pct in data["own"]:
            print(f"    {pct:5.1f}%  {frame}")
        print("  inclusive:")
        for frame, pct in data["inclusive"]:
            print(f"    {pct:5.1f}%  {frame}")
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
