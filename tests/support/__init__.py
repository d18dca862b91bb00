"""Real-process helpers for Baton's tests: a hermetic nats-server, a `baton up` stack, git remotes."""
