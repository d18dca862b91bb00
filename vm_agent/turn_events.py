"""What an ACP agent's updates mean as Baton events (`events/catalog.py`): pure translation.

Every text is cut to fit (`events.TOOL_CALL_TEXT_MAX_BYTES` for a tool call, all its texts
together), so each event stays far below the bus's payload limit; paths inside the workspace are
given relative to it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from acp.schema import (
    AgentPlanUpdate,
    ContentToolCallContent,
    FileEditToolCallContent,
    PermissionOption,
    PromptResponse,
    TerminalToolCallContent,
    TextContentBlock,
    ToolCallProgress,
    ToolCallStart,
    UsageUpdate,
)

from events import (
    TOOL_CALL_TEXT_MAX_BYTES,
    FileDiff,
    FileLocation,
    PermissionOptionOffered,
    PermissionRequested,
    PlanEntry,
    PlanUpdated,
    ToolCallStarted,
    ToolCallUpdated,
    UsageRecorded,
)

MAX_TITLE_BYTES = 1024
MAX_LOCATIONS = 100
MAX_DIFFS = 50
MAX_PLAN_ENTRIES = 200
MAX_PLAN_ENTRY_BYTES = 4 * 1024

DisplayPath = Callable[[str], str]
"""A path as the agent names it, as a person should read it (relative to the workspace)."""
TerminalOutput = Callable[[str], "str | None"]
"""The output so far of a terminal the client runs for the agent, by its id."""


def tool_call_started(update: ToolCallStart, *, display: DisplayPath, terminal_output: TerminalOutput) -> ToolCallStarted:
    diffs, output, raw_input, truncated = _fitted_content(update, display, terminal_output)
    return ToolCallStarted(
        tool_call_id=update.tool_call_id, title=cut(update.title, MAX_TITLE_BYTES), kind=update.kind or "other",
        status=update.status or "pending", locations=_locations(update.locations, display),
        raw_input=raw_input, diffs=diffs, output=output, truncated=truncated)


def tool_call_updated(update: ToolCallProgress, *, display: DisplayPath, terminal_output: TerminalOutput) -> ToolCallUpdated:
    diffs, output, _, truncated = _fitted_content(update, display, terminal_output)
    return ToolCallUpdated(
        tool_call_id=update.tool_call_id, status=update.status,
        title=cut(update.title, MAX_TITLE_BYTES) if update.title else None, kind=update.kind,
        locations=None if update.locations is None else _locations(update.locations, display),
        diffs=diffs, output=output, truncated=truncated)


def plan_updated(update: AgentPlanUpdate) -> PlanUpdated:
    entries = update.entries[:MAX_PLAN_ENTRIES]
    fitted = tuple(PlanEntry(content=cut(e.content, MAX_PLAN_ENTRY_BYTES), status=e.status, priority=e.priority)
                   for e in entries)
    truncated = len(update.entries) > len(entries) or any(
        f.content != e.content for f, e in zip(fitted, entries, strict=True))
    return PlanUpdated(entries=fitted, truncated=truncated)


def usage_of_update(update: UsageUpdate) -> UsageRecorded:
    """ACP `usage_update`: the context window and the session's cost so far."""
    cost = update.cost
    return UsageRecorded(source="usage_update", context_used=update.used, context_size=update.size,
                         cost_amount=cost.amount if cost else None, cost_currency=cost.currency if cost else None)


def usage_of_response(response: PromptResponse) -> UsageRecorded | None:
    """The turn's token counts: PromptResponse.usage, else those an agent puts in `_meta`
    (Gemini CLI: `_meta.quota.token_count`); None when it gives neither."""
    usage = response.usage
    if usage is not None:
        return UsageRecorded(
            source="prompt_response", input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
            total_tokens=usage.total_tokens, cached_read_tokens=usage.cached_read_tokens,
            cached_write_tokens=usage.cached_write_tokens, thought_tokens=usage.thought_tokens)
    quota = (response.field_meta or {}).get("quota")
    counts = quota.get("token_count") if isinstance(quota, dict) else None
    if not isinstance(counts, dict):
        return None
    input_tokens, output_tokens = _count(counts.get("input_tokens")), _count(counts.get("output_tokens"))
    total = input_tokens + output_tokens if input_tokens is not None and output_tokens is not None else None
    return UsageRecorded(source="prompt_response_meta", input_tokens=input_tokens,
                         output_tokens=output_tokens, total_tokens=total)


def permission_requested(request_id: str, tool_call: Any, options: Sequence[PermissionOption]) -> PermissionRequested:
    title = getattr(tool_call, "title", None) or getattr(tool_call, "tool_call_id", "") or "?"
    return PermissionRequested(
        request_id=request_id, tool_call_id=getattr(tool_call, "tool_call_id", "") or "",
        title=cut(title, MAX_TITLE_BYTES),
        options=tuple(PermissionOptionOffered(option_id=o.option_id, name=cut(o.name, MAX_TITLE_BYTES), kind=o.kind)
                      for o in options))


def cut(text: str, max_bytes: int) -> str:
    """`text`'s head of at most `max_bytes` UTF-8 bytes, never inside a character."""
    if len(text) * 4 <= max_bytes:
        return text
    return text.encode("utf-8", "surrogatepass")[:max_bytes].decode("utf-8", "ignore")


def fit(texts: Sequence[str | None], budget: int) -> tuple[list[str | None], bool]:
    """`texts` cut so that together they hold at most `budget` UTF-8 bytes, the smallest kept
    whole and the rest cut to an equal share; and whether any was cut."""
    sizes = [len(t.encode("utf-8", "surrogatepass")) if t else 0 for t in texts]
    if sum(sizes) <= budget:
        return list(texts), False
    shares, remaining = [0] * len(texts), budget
    order = sorted(range(len(texts)), key=sizes.__getitem__)
    for placed, index in enumerate(order):
        shares[index] = min(sizes[index], remaining // (len(texts) - placed))
        remaining -= shares[index]
    return [cut(t, share) if t else t for t, share in zip(texts, shares, strict=True)], True


def _fitted_content(
    update: ToolCallStart | ToolCallProgress, display: DisplayPath, terminal_output: TerminalOutput,
) -> tuple[tuple[FileDiff, ...], str | None, str | None, bool]:
    """The call's diffs, text output and raw input (JSON), cut to fit one event together."""
    content = update.content or []
    edits = [block for block in content if isinstance(block, FileEditToolCallContent)]
    output = _output_text(content, terminal_output) if update.content is not None else None
    raw_input = _json_text(update.raw_input) if isinstance(update, ToolCallStart) else None
    texts = [text for edit in edits[:MAX_DIFFS] for text in (edit.old_text, edit.new_text)]
    fitted, truncated = fit([*texts, output, raw_input], TOOL_CALL_TEXT_MAX_BYTES)
    diffs = tuple(
        FileDiff(path=display(edit.path), old_text=fitted[2 * i], new_text=fitted[2 * i + 1] or "",
                 truncated=(fitted[2 * i], fitted[2 * i + 1]) != (edit.old_text, edit.new_text))
        for i, edit in enumerate(edits[:MAX_DIFFS]))
    return diffs, fitted[-2], fitted[-1], truncated or len(edits) > MAX_DIFFS


def _output_text(content: Sequence[Any], terminal_output: TerminalOutput) -> str | None:
    pieces: list[str] = []
    for block in content:
        if isinstance(block, ContentToolCallContent):
            inner = block.content
            pieces.append(inner.text if isinstance(inner, TextContentBlock) else f"[{inner.type}]")
        elif isinstance(block, TerminalToolCallContent):
            text = terminal_output(block.terminal_id)
            if text is not None:
                pieces.append(text)
    return "\n".join(pieces) if pieces else None


def _locations(locations: Sequence[Any] | None, display: DisplayPath) -> tuple[FileLocation, ...]:
    return tuple(FileLocation(path=display(loc.path), line=loc.line) for loc in (locations or [])[:MAX_LOCATIONS])


def _json_text(value: Any) -> str | None:
    if value is None:
        return None
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and value >= 0 else None
