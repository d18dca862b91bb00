"""Coding agents that ship with Baton (each a real ACP agent run as its own process)."""

from __future__ import annotations


def import_acp_cheaply() -> None:
    """Make importing the ACP SDK about three times as cheap, for an agent that starts per task.

    The only module that reaches into pydantic's private internals (contract test:
    tests/unit/test_acp_import_shortcut.py). Call it before importing `acp`. Two costs go:

    - The SDK's ~280 schema models ask pydantic for `use_attribute_docstrings`, so at import
      pydantic tokenizes and parses the source of every class to copy field docstrings into
      field descriptions (~0.3 s of CPU). An agent only validates and serializes messages,
      which descriptions do not touch.
    - pydantic builds every model's validator and serializer when its class is made; with
      `defer_build` it builds one on its first use, so an agent pays only for the few messages
      it exchanges (~0.1 s less on a 2-CPU machine).

    With a pydantic that no longer has these hooks, it changes nothing.
    """
    try:
        from pydantic._internal import _config, _fields
    except ImportError:
        return
    if hasattr(_fields, "extract_docstrings_from_cls"):
        _fields.extract_docstrings_from_cls = lambda cls, use_inspect=False: {}
    defaults = getattr(_config, "config_defaults", None)
    if isinstance(defaults, dict) and "defer_build" in defaults:
        defaults["defer_build"] = True
