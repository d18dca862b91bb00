"""Coding agents that ship with Baton (each a real ACP agent run as its own process)."""

from __future__ import annotations


def skip_schema_docstrings() -> None:
    """Make importing the ACP SDK about twice as cheap, for an agent that starts per task.

    The SDK's ~280 schema models ask pydantic for `use_attribute_docstrings`, so at import
    pydantic tokenizes and parses the source of every class to copy field docstrings into
    field descriptions (~0.3 s of CPU, half of `import acp`). An agent only validates and
    serializes messages, which descriptions do not touch. Call before importing `acp`; with a
    pydantic that no longer has this private hook, it changes nothing.
    """
    try:
        from pydantic._internal import _fields
    except ImportError:
        return
    if hasattr(_fields, "extract_docstrings_from_cls"):
        _fields.extract_docstrings_from_cls = lambda cls, use_inspect=False: {}
