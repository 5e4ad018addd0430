"""Which failures are the infrastructure's (database, object storage, broker unreachable) rather
than the work's.

An outage must not turn valid work into a FAILED job: such failures wait and retry, with their
own budget (``MP4T_OUTAGE_BUDGET_S``), apart from the attempt counter that stops crash loops.
"""
from __future__ import annotations

import pika.exceptions
import urllib3.exceptions
from dramatiq.errors import BrokerError
from minio.error import S3Error
from peewee import InterfaceError, OperationalError

from storage.objects import StorageError

_INFRASTRUCTURE = (ConnectionError, TimeoutError, urllib3.exceptions.HTTPError, OperationalError, InterfaceError,
                   pika.exceptions.AMQPError, BrokerError, StorageError)
# S3 answers that mean "the service is struggling", not "your request is wrong".
_S3_TRANSIENT = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "ServerBusy"}


def is_infrastructure(exc: BaseException) -> bool:
    """True when ``exc`` says a service we depend on is unreachable or overloaded right now."""
    if isinstance(exc, S3Error):
        return exc.code in _S3_TRANSIENT
    return isinstance(exc, _INFRASTRUCTURE)


def outage_retries(budget_s: float, min_backoff_ms: int, max_backoff_ms: int) -> int:
    """How many retries, with backoff doubling from ``min_backoff_ms`` up to ``max_backoff_ms``
    (and jitter taking up to half of each), it takes to wait out an outage of ``budget_s``."""
    waited, retries = 0.0, 0
    while waited < budget_s:
        waited += min(min_backoff_ms * 2 ** min(retries, 32), max_backoff_ms) / 2000
        retries += 1
    return retries
