"""Process-wide handles built once at start-up: settings, database, object store, progress bus."""
from __future__ import annotations

import dataclasses
from typing import Any

from mp4totext import config
from mp4totext.events import ProgressBus, make_bus
from storage import schema
from storage.objects import ObjectStore, make_store


@dataclasses.dataclass
class Runtime:
    settings: config.Settings
    db: Any
    store: ObjectStore
    bus: ProgressBus


_runtime: Runtime | None = None


def init(settings: config.Settings | None = None, bus: ProgressBus | None = None) -> Runtime:
    global _runtime
    settings = settings or config.settings()
    db = schema.init_db(settings.resolved_database_url, settings.database_pool_size)
    _runtime = Runtime(settings=settings, db=db, store=make_store(settings), bus=bus or make_bus(settings))
    return _runtime


def get() -> Runtime:
    if _runtime is None:
        raise RuntimeError("runtime not initialised: call core.runtime.init() at start-up")
    return _runtime
