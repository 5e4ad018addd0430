"""The composition root: the one place that wires the server and the workers together (CLI entry point)."""
