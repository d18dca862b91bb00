"""A pull request's title and description, written from the task's own events (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TITLE_MAX = 72
SUMMARY_LINES = 12
SPOKEN = ("message", "stdout")
"""Output streams that are the agent talking (not its thoughts, tools or errors)."""


@dataclass(frozen=True)
class PullRequestText:
    title: str
    body: str


def pull_request_text(task_id: str, events: list[dict[str, Any]], *, files: list[str], task_url: str) -> PullRequestText:
    """Title from the prompt's first line; body: the prompt and each follow-up, the agent's
    closing words (its last turn's last lines), the files changed, tokens and cost, the task's link."""
    prompts = [e["data"]["prompt"] for e in events if e["type"] in ("TaskSubmitted", "FollowUpSubmitted")]
    first = prompts[0].strip().splitlines()[0] if prompts else task_id
    title = first if len(first) <= TITLE_MAX else first[: TITLE_MAX - 1] + "…"
    sections = ["### Task", _quoted(prompts[0]) if prompts else ""]
    for turn, follow_up in enumerate(prompts[1:], start=2):
        sections += [f"### Follow-up (turn {turn})", _quoted(follow_up)]
    if summary := closing_words(events):
        sections += ["### The agent's summary", summary]
    sections += ["### Files changed", "\n".join(f"- `{name}`" for name in files) or "_none_"]
    sections += ["### Usage", usage_line(events)]
    sections += ["", f"Opened by Baton for task [{task_id}]({task_url})."]
    return PullRequestText(title=title, body="\n\n".join(sections))


def closing_words(events: list[dict[str, Any]]) -> str:
    """The agent's last lines of its last turn (after the last PromptDelivered), joined lines whole."""
    last_prompt = max((i for i, e in enumerate(events) if e["type"] == "PromptDelivered"), default=-1)
    lines: list[str] = []
    pending = ""
    for envelope in events[last_prompt + 1:]:
        data = envelope["data"]
        if envelope["type"] != "AgentOutput" or data.get("stream") not in SPOKEN:
            continue
        pending += data["text"]
        if not data.get("continues"):
            lines += pending.splitlines()
            pending = ""
    lines += pending.splitlines()
    return "\n".join(line for line in lines[-SUMMARY_LINES:]).strip()


def usage_line(events: list[dict[str, Any]]) -> str:
    """Tokens summed over the turns' reports; cost: the largest cumulative figure reported."""
    usages = [e["data"] for e in events if e["type"] == "UsageRecorded"]
    tokens = sum((u.get("input_tokens") or 0) + (u.get("output_tokens") or 0)
                 for u in usages if u.get("source", "").startswith("prompt_response"))
    costs = [(u["cost_amount"], u.get("cost_currency") or "") for u in usages if u.get("cost_amount") is not None]
    parts = [f"{tokens:,} tokens" if tokens else "tokens not reported"]
    if costs:
        amount, currency = max(costs)
        parts.append(f"cost {amount:.4f} {currency}".strip())
    return ", ".join(parts)


def _quoted(text: str) -> str:
    return "\n".join(f"> {line}" for line in text.strip().splitlines())
