"""The projector: keeps the read models (the task board) current from the stream."""
