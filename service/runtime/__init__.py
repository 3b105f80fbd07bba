"""What every room of the service shares: settings, metrics, memory budgets, the heap, and the
lifecycle that builds the running service from settings."""
