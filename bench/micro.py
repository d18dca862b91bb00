"""Micro-benchmarks behind the hot spots in docs/benchmarks.md: `python -m bench.micro`.

In-process, no stack. Each isolates one cost seen in the profiles:

- `reload`: what one `store.get_task_aggregate(Session, task_id)` costs (the vm_agent's
  `session()`, which its exit watcher calls every 0.2 s) as the session's output grows;
- `save`: recording AgentOutput the way `SessionRunner.output` does (one `store.save` per line)
  versus one save for a batch of lines;
- `commit`: one SQLite WAL commit with `synchronous=FULL` (the default, an fsync per commit)
  versus `synchronous=NORMAL`, on the disk of the temp dir;
- `projection_what_if`: the projection rebuild (bench/projection.py) as it is, then with the
  read models' SQLite connections set to `synchronous=NORMAL`, then with one transaction per
  100 events (emulated by patching `SQLiteDatabase.transaction` in this process only) — what
  the fixes suggested in docs/benchmarks.md would buy, without changing Baton's code.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from services.runtime.store import ServiceStore, sqlite_env
from vm_agent.domain import Session

LINE = "00000001 " + "x" * 90 + "\n"


def _session_store(tmp: Path, name: str) -> tuple[ServiceStore, Session]:
    store = ServiceStore("vm_agent", sqlite_env(tmp / f"{name}.sqlite"))
    session = Session("bench0000000000", "bench0000000000-a1", "shell", None)
    store.save(session)
    session.started("s" * 32)
    session.prompt_delivered("0" * 64)
    store.save(session)
    return store, session


def reload_cost(sizes: tuple[int, ...] = (1_000, 5_000, 20_000)) -> list[dict[str, Any]]:
    out = []
    with tempfile.TemporaryDirectory(prefix="bench-micro-") as tmp:
        store, session = _session_store(Path(tmp), "reload")
        recorded = 0
        for size in sizes:
            while recorded < size:
                for _ in range(min(1_000, size - recorded)):
                    session.output("stdout", LINE)
                    recorded += 1
                store.save(session)  # Batched here only to build the history quickly.
            started = time.perf_counter()
            store.get_task_aggregate(Session, session.task_id)
            seconds = time.perf_counter() - started
            out.append({"output_events": size, "reload_ms": round(1000 * seconds, 1),
                        "share_of_a_0.2s_poll": round(seconds / (seconds + 0.2), 2)})
        store.close()
    return out


def save_cost(lines: int = 2_000, batch: int = 100) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-micro-") as tmp:
        store, session = _session_store(Path(tmp), "each")
        started = time.perf_counter()
        for _ in range(lines):
            session.output("stdout", LINE)
            store.save(session)
        each = lines / (time.perf_counter() - started)
        store.close()

        store, session = _session_store(Path(tmp), "batched")
        started = time.perf_counter()
        for i in range(lines):
            session.output("stdout", LINE)
            if (i + 1) % batch == 0:
                store.save(session)
        store.save(session)
        batched = lines / (time.perf_counter() - started)
        store.close()
    return {"lines": lines, "save_each_eps": round(each), f"save_per_{batch}_eps": round(batched)}


def commit_cost(commits: int = 1_000) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-micro-") as tmp:
        for sync in ("FULL", "NORMAL"):
            db = sqlite3.connect(Path(tmp) / f"{sync}.sqlite", isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={sync}")
            db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT)")
            started = time.perf_counter()
            for _ in range(commits):
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT INTO t (body) VALUES (?)", ("x" * 360,))
                db.execute("COMMIT")
            seconds = time.perf_counter() - started
            db.close()
            out[f"synchronous_{sync}_us_per_commit"] = round(1e6 * seconds / commits)
    return out


def projection_what_if(events: int = 20_000) -> dict[str, Any]:
    import contextlib

    from bench import projection
    from projections import sql

    out: dict[str, Any] = {"events": events}
    def per_event_eps() -> int:
        """The one-call-per-event path (`apply`, `append`), whatever batch methods exist."""
        result = projection.run(events, per_event_max=events)
        return round((result.get("per_event") or result)["combined_eps"])

    out["as_is_eps"] = per_event_eps()

    original_init = sql.SQLiteDatabase.__init__

    def init_normal(self: Any, path: Path) -> None:
        original_init(self, path)
        self._db.execute("PRAGMA synchronous=NORMAL")

    sql.SQLiteDatabase.__init__ = init_normal  # type: ignore[method-assign]
    try:
        out["synchronous_normal_eps"] = per_event_eps()
    finally:
        sql.SQLiteDatabase.__init__ = original_init  # type: ignore[method-assign]

    # One transaction per 100 events: `transaction()` only opens one every 100th call.
    original_transaction = sql.SQLiteDatabase.transaction
    calls = {"n": 0}

    @contextlib.contextmanager
    def batched(self: Any):  # type: ignore[no-untyped-def]
        with self._lock:
            if calls["n"] % 100 == 0:
                if self._db.in_transaction:
                    self._db.execute("COMMIT")
                self._db.execute("BEGIN IMMEDIATE")
            calls["n"] += 1
            yield self

    sql.SQLiteDatabase.transaction = batched  # type: ignore[method-assign]
    original_close = sql.SQLiteDatabase.close

    def close(self: Any) -> None:
        if self._db.in_transaction:
            self._db.execute("COMMIT")
        original_close(self)

    sql.SQLiteDatabase.close = close  # type: ignore[method-assign]
    try:
        out["one_transaction_per_100_eps"] = per_event_eps()
    finally:
        sql.SQLiteDatabase.transaction = original_transaction  # type: ignore[method-assign]
        sql.SQLiteDatabase.close = original_close  # type: ignore[method-assign]
    return out


def main() -> None:
    result = {"commit": commit_cost(), "save": save_cost(), "reload": reload_cost(),
              "projection_what_if": projection_what_if()}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
