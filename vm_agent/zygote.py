"""A vm_agent template process: imported once, forked per vm_agent.

A fresh vm_agent spends most of a second of CPU importing (FastAPI, pydantic, the ACP SDK,
eventsourcing, nats-py) before it can serve; on a small machine running many tasks that is the
largest cost on the path from submit to prompt. The zygote pays it once: it imports everything a
vm_agent needs, then forks a child per request, and the child runs `vm_agent.main.main` with its
own arguments, environment, log file and session, exactly as a freshly started one would.

Protocol, over one end of a socketpair handed to it by its parent (the provisioner), so only that
parent can ask: the zygote writes `{"ready": true}` once imported, then answers each request line
`{"argv": [...], "env": {...}, "log": "path"}` with `{"pid": N}` or `{"error": "..."}`. It exits
when the parent's end closes (the parent exited); the vm_agents it started keep running (each
in its own session, as before), and it never waits for them: the kernel reaps them.

Run as `python -m vm_agent.zygote --fd N`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import threading
import traceback
from pathlib import Path

import vm_agent.main  # noqa: F401 - the point: everything a vm_agent imports, imported once.


def _child(request: dict, listener: socket.socket) -> None:
    """Runs in the forked child: become a vm_agent process, never return."""
    code = 1
    try:
        listener.close()
        # `ps -o comm` and top name it; its command line (and /proc/<pid>/environ, by which
        # `baton up` finds what belongs to a data dir) stay the zygote's, never overwritten.
        with contextlib.suppress(OSError):
            Path("/proc/self/comm").write_text("baton-vm_agent")
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # The vm_agent waits for its own children.
        os.setsid()
        log_fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        null_fd = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null_fd, 0)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(log_fd)
        os.close(null_fd)
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["vm_agent", *request["argv"]]
        vm_agent.main.main(request["argv"])
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
        if exit_.code is not None and not isinstance(exit_.code, int):
            print(exit_.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _fork(request: dict, listener: socket.socket) -> dict:
    if not isinstance(request.get("argv"), list) or not isinstance(request.get("env"), dict) \
            or not isinstance(request.get("log"), str):
        return {"error": "a request needs argv (list), env (object) and log (path)"}
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(request, listener)
    return {"pid": pid}


def serve(channel: socket.socket) -> None:
    # Forking is only safe while this process runs nothing else: no threads, no event loop.
    assert threading.active_count() == 1, "the zygote must stay single-threaded"
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # The kernel reaps the vm_agents we fork.
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Its parent decides when it ends.
    reader = channel.makefile("rb")
    channel.sendall(b'{"ready": true}\n')
    for line in reader:
        try:
            reply = _fork(json.loads(line), channel)
        except (ValueError, OSError) as error:
            reply = {"error": repr(error)}
        channel.sendall(json.dumps(reply).encode() + b"\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vm_agent.zygote", description=__doc__)
    parser.add_argument("--fd", type=int, required=True, help="this end of the parent's socketpair")
    args = parser.parse_args(argv)
    os.umask(0o077)
    serve(socket.socket(fileno=args.fd))


if __name__ == "__main__":
    main()
