"""The task runner: owns each Task's state machine, from submission to its end."""
