"""Dramatiq workers: the stage runner (pipeline), actor declarations (actors), pure stages (stages),
the worker process (main)."""
