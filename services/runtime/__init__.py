"""What every Baton process shares: settings, the event store, the relay to NATS, consumers."""
