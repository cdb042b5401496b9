"""Training: task (what), trainer (how), strategies, schedules and optimisers."""
