"""The `baton` command line: run the stack, submit and follow tasks."""
