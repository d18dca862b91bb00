"""A service outside Baton reacting to its events: each completed task's branch, posted somewhere.

Here "somewhere" is a JSON line appended to --out (swap `post_branch` for an HTTP call, a chat
message, a deploy). Run it with a read-only credential:

    baton credentials create --name reactor --read-only --out reactor.creds
    python examples/react_to_completed_tasks.py --nats-url nats://127.0.0.1:4222 \
        --creds reactor.creds --durable reader-reactor --out completed.jsonl

Stopped (Ctrl-C, SIGTERM) and started again, it goes on after the last task it posted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from pathlib import Path

from events import TaskCompleted
from events.client import subscribe


def post_branch(out: Path, task_id: str, event: TaskCompleted, event_id: str) -> None:
    with out.open("a") as handle:
        handle.write(json.dumps({"task_id": task_id, "branch": event.branch, "commit": event.commit,
                                 "turn": event.turn, "event_id": event_id}) + "\n")


async def react(args: argparse.Namespace) -> None:
    async for received in subscribe(args.nats_url, args.creds, args.durable):
        if isinstance(received.event, TaskCompleted):
            post_branch(args.out, received.envelope.task_id, received.event, received.envelope.event_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--nats-url", required=True)
    parser.add_argument("--creds", required=True, type=Path)
    parser.add_argument("--durable", required=True, help="printed by `baton credentials create`")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    async def run() -> None:
        task = asyncio.current_task()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await react(args)
        except asyncio.CancelledError:
            pass  # Stopped: the events handled so far are acked.

    asyncio.run(run())


if __name__ == "__main__":
    main()
