"""Coding agents that ship with Baton (each a real ACP agent run as its own process)."""
