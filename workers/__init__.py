"""Dramatiq workers: the stage runner (workers.pipeline), actor declarations (workers.actors), pure stages (workers.stages), the worker process (workers.main)."""
