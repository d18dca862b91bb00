"""Baton's services: each a process that reacts to events and records its own."""
