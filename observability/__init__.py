"""Logging (structlog), tracing and metrics setup shared by servers and workers."""
