"""Read models projected from the event stream for the UI, the API and auditors."""
