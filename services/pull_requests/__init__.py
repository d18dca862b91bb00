"""The pull-requests service: a finished task's branch becomes a GitHub pull request."""
