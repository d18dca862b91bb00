"""The provisioner: turns WorkspaceRequested into a checked-out repo with a vm_agent beside it."""
