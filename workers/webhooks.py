"""The deliver_webhook actor (critical queue): one HTTP attempt of a webhook delivery.

core.webhooks owns the state machine (claim, complete, the schedule in the database); this
module does the network part: resolve and check the target again (DNS may have changed since
the endpoint was created), connect to the checked address, POST the signed body once, no
redirects, a short timeout. The next attempt goes back on the queue as a delayed message when
it is near; further ones are left to the maintenance sweep (``requeue_due``), which also
recovers any delivery whose message was lost.
"""
from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog

from core import runtime, webhooks
from core.queue import enqueue
from mp4totext.config import Settings, WebhookSettings, section
from observability import tracing
from workers.supervisor import Policy, Unit, supervise
from workers.watchdog import Watchdog

log = structlog.get_logger(__name__)

MAX_MESSAGE_DELAY_S = 3600.0  # longer waits are the sweep's: a delayed message sits in a worker's memory
SWEEP_GRACE_S = 30.0  # a due delivery's own message gets this long before the sweep sends another
MAX_ERROR_BODY = 300


@functools.lru_cache(maxsize=8)
def _allow(text: str) -> tuple:
    return webhooks.parse_nets(text)


def _connect_url(target: webhooks.Target, address: str) -> str:
    """The URL with its host replaced by the address that was checked (no second DNS lookup)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    host = f"[{ip}]" if ip.version == 6 else str(ip)
    parts = urlsplit(target.url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return f"{target.scheme}://{host}:{target.port}{path}"


def post(attempt: webhooks.Attempt, settings: WebhookSettings | Settings) -> tuple[int, str]:
    """One attempt: (HTTP status, error text); status 0 when there was no answer. Never raises:
    whatever goes wrong is a failed attempt, so the delivery's retry schedule applies."""
    s: WebhookSettings = section(settings, WebhookSettings)  # MP4T_WEBHOOK_*
    try:
        target = webhooks.resolve_target(attempt.url, _allow(s.allow_nets))
    except webhooks.TargetRefused as exc:
        return 0, f"refused: {exc}"
    try:
        return _send(attempt, target, s)
    except Exception as exc:  # httpx.HTTPError, and anything else (a bad header value, a TLS library error)
        return 0, f"{type(exc).__name__}: {exc}"[:500]


def _send(attempt: webhooks.Attempt, target: webhooks.Target, s: WebhookSettings) -> tuple[int, str]:
    """POST once to the checked address, with the name (ASCII/IDNA form) in Host and SNI."""
    timestamp = int(time.time())
    headers = webhooks.headers(attempt.secrets, attempt.msg_id, timestamp, attempt.body)
    default_port = 443 if target.scheme == "https" else 80
    headers["host"] = target.host if target.port == default_port else f"{target.host}:{target.port}"
    if ":" in target.host:  # an IPv6 literal
        headers["host"] = f"[{target.host}]" + ("" if target.port == default_port else f":{target.port}")
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    with httpx.Client(timeout=s.timeout_s, follow_redirects=False, trust_env=False) as http:
        with http.stream("POST", _connect_url(target, target.addresses[0]), content=attempt.body.encode(),
                         headers=headers, extensions=extensions) as response:
            if 200 <= response.status_code < 300:
                return response.status_code, ""
            text = b""
            for chunk in response.iter_bytes():
                text += chunk
                if len(text) >= MAX_ERROR_BODY:
                    break
            shown = text[:MAX_ERROR_BODY].decode("utf-8", "replace").strip()
            return response.status_code, f"HTTP {response.status_code}" + (f": {shown}" if shown else "")


def deliver(delivery_id: str) -> None:
    """The actor: claim the delivery if it is due, POST once, record the answer, schedule the next."""
    s = runtime.get().settings
    structlog.contextvars.bind_contextvars(delivery_id=delivery_id, stage=webhooks.ACTOR)
    lease_s = 2 * s.webhook.timeout_s + 30
    attempt = webhooks.claim(delivery_id, lease_s=lease_s)
    if attempt is None:
        return
    supervise(_DeliveryUnit(attempt, lease_s, s), s.cancel_poll_s)


class _DeliveryUnit(Unit):
    """One HTTP attempt as the supervisor runs it. The delivery's own schedule (core.webhooks)
    decides its retries; the supervisor handles what goes wrong around the POST (the database out
    while the answer is recorded: retried uncounted). Nothing cancels one attempt, the deadline
    bounds it; nothing is given back: the claim runs out (claim_until), and a retry before that
    finds it taken and the sweep sends it."""

    stage = webhooks.ACTOR

    def __init__(self, attempt: webhooks.Attempt, lease_s: float, s: Settings) -> None:
        self.attempt, self.s = attempt, s.webhook
        self.attempts, self.deadline = attempt.attempt, time.monotonic() + lease_s  # its claim runs out then
        self.policy = Policy(what="the webhook attempt", max_attempts=s.max_attempts,
                             time_limit=f"the webhook attempt ran longer than its lease of {lease_s:g} s")

    def run(self, _dog: Watchdog) -> tuple[int, str, webhooks.Outcome | None, float]:
        with tracing.stage_span("webhook POST", **{"mp4t.webhook.attempt": self.attempt.attempt}):
            started = time.monotonic()
            status, error = post(self.attempt, self.s)
        outcome = webhooks.complete(self.attempt, status, error,
                                    webhooks.retry_schedule(self.s.retry_schedule_s))
        if outcome is not None and outcome.retry_in_s is not None and outcome.retry_in_s <= MAX_MESSAGE_DELAY_S:
            enqueue(webhooks.ACTOR, self.attempt.delivery_id, webhooks.PRIORITY,
                    delay_ms=int(outcome.retry_in_s * 1000) + 50)
        return status, error, outcome, time.monotonic() - started

    def succeeded(self, out: tuple[int, str, webhooks.Outcome | None, float]) -> tuple[str, dict[str, Any]]:
        status, error, outcome, seconds = out
        return (outcome.state.lower() if outcome else "superseded"), {
            "endpoint_id": self.attempt.endpoint_id, "webhook_id": self.attempt.msg_id,
            "attempt": self.attempt.attempt, "status": status, "error": error or None, "seconds": round(seconds, 3),
            "retry_in_s": outcome.retry_in_s if outcome else None}

    def failed(self, reason: str, message: str) -> bool:
        return False  # its claim runs out; the maintenance sweep sends it again (requeue_due)


def requeue_due() -> int:
    """The maintenance sweep's part: send due deliveries whose message was lost or never made, and
    forget finished deliveries older than MP4T_WEBHOOK_LOG_DAYS."""
    ids = webhooks.due(SWEEP_GRACE_S)
    for delivery_id in ids:
        enqueue(webhooks.ACTOR, delivery_id, webhooks.PRIORITY)
    days = runtime.get().settings.webhook_log_days
    pruned = webhooks.prune(dt.timedelta(days=days)) if days > 0 else 0
    if pruned:
        log.info("webhook_log_pruned", events=pruned, older_than_days=days)
    return len(ids)
