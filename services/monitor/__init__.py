"""The flow monitor: follows every task against the flow contract's deadlines and names each gap."""
