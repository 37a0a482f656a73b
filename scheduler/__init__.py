"""APScheduler jobs that observe the exchange and feed events to the machines (issue: reconciliation)."""
