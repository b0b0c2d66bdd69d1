"""The processes that run the node: the CLI, the serve loop with its background services,
and the analysis worker."""
