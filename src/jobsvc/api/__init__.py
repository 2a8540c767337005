"""The HTTP layer: thin routes over the service, and the one mapping of errors to statuses."""
