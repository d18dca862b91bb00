"""Verify the audit log: its hash chain, and that it says exactly what the stream and the stores say."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from projections.audit_log import GENESIS, AuditLog, canonical, chain_hash


@dataclass(frozen=True)
class Finding:
    """One thing wrong with the history: kind is missing, extra, reordered, altered or broken-chain."""

    kind: str
    event_id: str
    stream_seq: int | None
    detail: str

    def __str__(self) -> str:
        at = f" (stream_seq {self.stream_seq})" if self.stream_seq is not None else ""
        return f"{self.kind}: event {self.event_id}{at}: {self.detail}"


def verify_chain(log: AuditLog) -> tuple[int, list[Finding]]:
    """Recompute every hash in stream order; returns (records checked, findings)."""
    findings, previous, count = [], GENESIS, 0
    for record in log.records():
        count += 1
        seq, event_id = record["stream_seq"], record["event_id"]
        if record["prev_hash"] != previous:
            findings.append(Finding("broken-chain", event_id, seq,
                                    "does not follow the record before it (one was deleted, inserted or moved)"))
        if chain_hash(record["prev_hash"], seq, record["envelope"]) != record["hash"]:
            findings.append(Finding("altered", event_id, seq, "its content no longer matches its hash"))
        elif _columns_disagree(record):
            findings.append(Finding("altered", event_id, seq, "its indexed columns disagree with its envelope"))
        previous = record["hash"]
    return count, findings


def _columns_disagree(record: dict[str, Any]) -> bool:
    import json

    envelope = json.loads(record["envelope"])
    return any(envelope.get(k) != record[k] for k in ("event_id", "task_id", "type", "actor"))


def compare_with_stream(log: AuditLog, stream: Iterable[tuple[int, dict[str, Any]]]) -> tuple[int, list[Finding]]:
    """Every stream event in the log at its sequence with the same content, and nothing else."""
    logged = {r["stream_seq"]: r for r in log.records()}
    seq_of = {r["event_id"]: seq for seq, r in logged.items()}
    findings, count = [], 0
    for seq, envelope in stream:
        count += 1
        record, event_id = logged.pop(seq, None), envelope["event_id"]
        if record is None:
            kind = "reordered" if event_id in seq_of else "missing"
            detail = (f"logged at stream_seq {seq_of[event_id]}" if kind == "reordered"
                      else f"on the stream ({envelope['type']} of task {envelope['task_id']}) but not in the log")
            findings.append(Finding(kind, event_id, seq, detail))
        elif record["event_id"] != event_id:
            findings.append(Finding("reordered", record["event_id"], seq, f"the stream has {event_id} here"))
        elif record["envelope"] != canonical(envelope):
            findings.append(Finding("altered", event_id, seq, "differs from the stream's copy"))
    for seq, record in logged.items():
        if record["event_id"] not in {f.event_id for f in findings}:
            findings.append(Finding("extra", record["event_id"], seq, "in the log but not on the stream"))
    return count, findings


def compare_with_stores(log: AuditLog, stored: Iterable[tuple[str, dict[str, Any]]]) -> tuple[int, list[Finding]]:
    """Every event a service store relayed is in the log, unchanged."""
    by_id = {r["event_id"]: r for r in log.records()}
    findings, count = [], 0
    for source, envelope in stored:
        count += 1
        record = by_id.get(envelope["event_id"])
        if record is None:
            findings.append(Finding("missing", envelope["event_id"], None, f"recorded by {source} but not in the log"))
        elif record["envelope"] != canonical(envelope):
            findings.append(Finding("altered", envelope["event_id"], record["stream_seq"],
                                    f"differs from {source}'s own record"))
    return count, findings
