"""ACP agents shipped with Baton (runnable as ``python -m vm_agent.agents.<name>``)."""
