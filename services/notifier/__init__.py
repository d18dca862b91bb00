"""The notifier: tells people's webhooks (JSON or Slack) when a task ends or waits for them."""
