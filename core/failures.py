"""Which failures are the infrastructure's (database, object storage, broker unreachable) rather
than the work's.

An outage must not turn valid work into a FAILED job: such failures wait and retry, with their
own budget (``MP4T_OUTAGE_BUDGET_S``), apart from the attempt counter that stops crash loops.
"""
from __future__ import annotations

from typing import Callable

from mp4totext.errors import WorkError  # noqa: F401 - the failure policy's error, for core and workers
from storage import db, objects

# Each adapter says which of its own errors mean "unreachable or overloaded right now":
# storage.db for the database, storage.objects for the object store (which raises StorageError
# with ``transient`` set), core.queue for the broker. Nothing here knows a backend's types.
_CLASSIFIERS: list[Callable[[BaseException], bool]] = []


def register(classifier: Callable[[BaseException], bool]) -> None:
    """Add a test for an adapter's outage errors (idempotent for the same function)."""
    if classifier not in _CLASSIFIERS:
        _CLASSIFIERS.append(classifier)


def is_infrastructure(exc: BaseException) -> bool:
    """True when ``exc`` says a service we depend on is unreachable or overloaded right now."""
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    transient = getattr(exc, "transient", None)
    if isinstance(transient, bool):
        return transient
    return any(classify(exc) for classify in _CLASSIFIERS)


register(db.is_outage)
register(objects.is_outage)


def outage_retries(budget_s: float, min_backoff_ms: int, max_backoff_ms: int) -> int:
    """How many retries, with backoff doubling from ``min_backoff_ms`` up to ``max_backoff_ms``
    (and jitter taking up to half of each), it takes to wait out an outage of ``budget_s``."""
    waited, retries = 0.0, 0
    while waited < budget_s:
        waited += min(min_backoff_ms * 2 ** min(retries, 32), max_backoff_ms) / 2000
        retries += 1
    return retries
