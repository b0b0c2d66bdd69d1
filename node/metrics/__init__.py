"""Prometheus metrics and health checks: counted where the work is done (definitions),
published in one place (the `serve` supervisor's HTTP listener, node.metrics.http)."""
