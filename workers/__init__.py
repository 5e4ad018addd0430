"""Dramatiq workers: actors (workers.actors), broker (workers.broker), stages (workers.stages)."""
