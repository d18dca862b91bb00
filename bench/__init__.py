"""Baton's benchmark harness: `.venv/bin/python bench/run.py [--quick]` (see docs/benchmarks.md)."""
