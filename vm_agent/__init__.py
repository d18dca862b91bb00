"""Baton VM-side agent runtime: runs coding agents over ACP on the worker machine."""
