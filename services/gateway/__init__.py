"""The gateway: Baton's HTTP API (and, later, its web UI)."""
