"""Webhooks: events recorded with the state change that causes them, signed Standard Webhooks
deliveries, the SSRF checks on their targets, and each delivery's retry state machine.

An event is written (``record``) inside the transaction that ends a job, an AI item or a media:
one ``WebhookEvent`` (its JSON body, fixed then, so every attempt sends the same bytes), one
``WebhookDelivery`` per subscribed endpoint and one outbox message each for the
``deliver_webhook`` actor (critical queue). A rolled-back change leaves no event; a committed
one always has its messages (core.outbox). The schedule lives in the delivery row
(``next_attempt_time``): the actor claims a due delivery, POSTs, and ``complete`` records the
answer and the next attempt; the maintenance sweep re-sends due deliveries whose message was lost.

Standard Webhooks (https://www.standardwebhooks.com): ``webhook-id`` = ``msg_<event id>``,
``webhook-timestamp`` = Unix seconds of the attempt, ``webhook-signature`` = ``v1,<base64
HMAC-SHA256(secret, "id.timestamp.body")>``, one per secret still valid (rotation).
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import random
import secrets
import socket
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

import peewee as pw
import structlog

from core import outbox
from mp4totext.contracts import BROKER_MAX_PRIORITY
from storage.db import connection, database, locked, utcnow
from storage.tenancy import WebhookDelivery, WebhookEndpoint, WebhookEvent

log = structlog.get_logger(__name__)

ACTOR = "deliver_webhook"
PRIORITY = BROKER_MAX_PRIORITY  # notifications do not wait behind new uploads on the critical queue
EVENT_TYPES = ("transcription.succeeded", "transcription.failed", "transcription.cancelled",
               "enhancement.succeeded", "enhancement.failed", "enhancement.cancelled", "media.failed")
PENDING, SUCCEEDED, FAILED = "PENDING", "SUCCEEDED", "FAILED"
SECRET_PREFIX = "whsec_"
MAX_URL = 2048
SWEEP_BATCH = 500

# ---------------------------------------------------------------- secrets and signatures


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def secret_key(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, msg_id: str, timestamp: int, body: str) -> str:
    """One Standard Webhooks signature: ``v1,<base64 HMAC-SHA256 of "id.timestamp.body">``."""
    mac = hmac.new(secret_key(secret), f"{msg_id}.{timestamp}.{body}".encode(), hashlib.sha256).digest()
    return "v1," + base64.b64encode(mac).decode()


def headers(signing_secrets: Iterable[str], msg_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The request headers of one attempt; several secrets sign side by side (space-separated)."""
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": " ".join(sign(s, msg_id, timestamp, body) for s in signing_secrets),
            "content-type": "application/json", "user-agent": "mp4totext-webhooks/1"}


def webhook_id(event_id: str) -> str:
    """Stable for an event: every retry and redelivery (and every endpoint) gets the same id."""
    return "msg_" + event_id


def signing_secrets(endpoint: WebhookEndpoint, now: dt.datetime) -> list[str]:
    """The current secret, and the previous one during its grace period after a rotation."""
    found = [endpoint.secret]
    expire = endpoint.previous_secret_expire_time
    if endpoint.previous_secret and expire is not None and expire > now:
        found.append(endpoint.previous_secret)
    return found


# ---------------------------------------------------------------- payloads


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.replace(tzinfo=dt.timezone.utc).isoformat().replace("+00:00", "Z")


def body(event_type: str, time: dt.datetime, data: dict[str, Any]) -> str:
    return json.dumps({"type": event_type, "timestamp": _iso(time), "data": data}, separators=(",", ":"))


def _error(reason: str, message: str) -> dict[str, str] | None:
    return {"reason": reason, "message": message} if (reason or message) else None


def transcription_data(job: Any) -> dict[str, Any]:
    return {"name": f"transcriptions/{job.id}", "media": f"media/{job.media_id}", "state": job.state,
            "owner": getattr(job, "owner", "") or "", "error": _error(job.error_reason, job.error_message),
            "duration_s": job.duration_s, "create_time": _iso(job.create_time), "end_time": _iso(job.end_time),
            "warnings": list(job.warnings or [])}


def enhancement_data(item: Any, job: Any = None) -> dict[str, Any]:
    """The item's transcription is the resource (``name``); the item is ``enhancement_id`` in it."""
    return {"name": f"transcriptions/{item.transcription_id}", "enhancement_id": item.id, "kind": item.kind,
            "target_language_code": item.language, "state": item.state,
            "owner": (getattr(job, "owner", "") or "") if job is not None else "",
            "error": _error(item.error_reason, item.error_message)}


def media_data(media: Any, message: str) -> dict[str, Any]:
    return {"name": f"media/{media.id}", "state": "FAILED", "owner": getattr(media, "owner", "") or "",
            "filename": media.filename, "error": _error("MEDIA_INVALID", message)}


# ---------------------------------------------------------------- SSRF


class TargetRefused(ValueError):
    """A webhook URL we will not send to (the message says why and what to do)."""


def parse_nets(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    try:
        return tuple(ipaddress.ip_network(n.strip(), strict=False) for n in text.split(",") if n.strip())
    except ValueError as exc:
        raise SystemExit(f"configuration error: MP4T_WEBHOOK_ALLOW_NETS={text!r}: {exc}") from None


def _public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in ipaddress.ip_network("64:ff9b::/96"):  # NAT64
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None and not _public(embedded):
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_unspecified or ip.is_reserved or ip.is_loopback
                                 or ip.is_link_local or ip.is_private)


def address_allowed(address: str, allow: Iterable[Any] = ()) -> bool:
    """Whether a webhook may connect to ``address``: a public unicast address, or one in ``allow``."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip.version == net.version and ip in net for net in allow):
        return True
    return _public(ip)


@dataclasses.dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str  # as written (a name, in its ASCII/IDNA form, or an address)
    port: int
    addresses: tuple[str, ...]  # every address it resolved to, all of them allowed


def check_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of a URL we may POST to; TargetRefused otherwise (no DNS here)."""
    if not url:
        raise TargetRefused("url is required, e.g. https://example.com/hooks/mp4totext")
    if len(url) > MAX_URL:
        raise TargetRefused(f"url is {len(url)} characters long; at most {MAX_URL}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise TargetRefused(f"url {url[:200]!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise TargetRefused(f"url {url[:200]!r} must start with https:// (or http://)")
    if not parts.hostname:
        raise TargetRefused(f"url {url[:200]!r} has no host")
    if parts.username or parts.password:
        raise TargetRefused("url must not contain a user name or password; authenticate the request with the "
                            "webhook-signature header instead")
    if any(c.isspace() or ord(c) < 0x20 for c in url):
        raise TargetRefused("url must not contain spaces or control characters")
    return parts.scheme, ascii_host(parts.hostname), port or (443 if parts.scheme == "https" else 80)


def ascii_host(host: str) -> str:
    """The host's ASCII form: an internationalised name IDNA-encoded (``xn--...``), as it is
    resolved, and sent in the Host header and TLS SNI; TargetRefused if it cannot be."""
    if host.isascii():
        return host
    try:
        return host.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise TargetRefused(f"the host {host[:200]!r} of the webhook url is not a valid internationalised "
                            f"domain name ({exc})") from None


Resolver = Callable[[str, int], list[str]]


def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def resolve_target(url: str, allow: Iterable[Any] = (), resolver: Resolver = _getaddrinfo) -> Target:
    """Check ``url`` and resolve its host: every address must be allowed (a name that also points
    at a private address is refused), else TargetRefused saying which address and why."""
    scheme, host, port = check_url(url)
    allow = tuple(allow)
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise TargetRefused(f"the host {host!r} of the webhook url does not resolve ({exc}); "
                                "use a host name with a public DNS record") from None
    if not addresses:
        raise TargetRefused(f"the host {host!r} of the webhook url has no address")
    for address in addresses:
        if not address_allowed(address, allow):
            shown = host if host == address else f"{host!r} ({address})"
            raise TargetRefused(
                f"the webhook url points at {shown}, a loopback, private, link-local, multicast or otherwise "
                "non-public address; webhooks go to public addresses only (an operator can allow a network with "
                "MP4T_WEBHOOK_ALLOW_NETS)")
    return Target(url, scheme, host, port, tuple(addresses))


def check_event_types(types: Iterable[str]) -> list[str]:
    wanted = list(dict.fromkeys(types))
    unknown = [t for t in wanted if t not in EVENT_TYPES]
    if unknown:
        raise TargetRefused(f"unknown event type(s) {unknown}; choose from {', '.join(EVENT_TYPES)} "
                            "(or none for all)")
    return wanted


# ---------------------------------------------------------------- events (inside the caller's transaction)


def record(tenant_id: str, event_type: str, data: dict[str, Any]) -> str | None:
    """Write the event and a delivery (+ its outbox message) for every enabled endpoint of the
    tenant that subscribed to it. Call inside the transaction of the state change. Returns the
    event id, or None when no endpoint wants it (then nothing is written)."""
    endpoints = [e for e in WebhookEndpoint.select(WebhookEndpoint.id, WebhookEndpoint.event_types)
                 .where(WebhookEndpoint.tenant == tenant_id, WebhookEndpoint.disabled == False)  # noqa: E712
                 if not e.event_types or event_type in e.event_types]
    if not endpoints:
        return None
    now = utcnow()
    event = WebhookEvent.create(tenant=tenant_id, type=event_type, body=body(event_type, now, data),
                                create_time=now)
    for endpoint in endpoints:
        delivery = WebhookDelivery.create(tenant=tenant_id, endpoint=endpoint.id, event=event.id,
                                          event_type=event_type, next_attempt_time=now, create_time=now,
                                          update_time=now)
        outbox.add(ACTOR, delivery.id, PRIORITY)
    log.info("webhook_event", event_id=event.id, type=event_type, endpoints=len(endpoints))
    return event.id


def job_finished(job: Any) -> None:
    """A transcription reached SUCCEEDED, FAILED or CANCELLED (core.jobs, in its transaction)."""
    record(job.tenant_id, f"transcription.{str(job.state).lower()}", transcription_data(job))


def item_finished(item: Any, job: Any = None) -> None:
    """An AI item ended (core.enhancements / core.items, in their transaction)."""
    record(item.tenant_id, f"enhancement.{str(item.state).lower()}", enhancement_data(item, job))


def media_failed(media: Any, message: str) -> None:
    record(media.tenant_id, "media.failed", media_data(media, message))


# ---------------------------------------------------------------- the delivery state machine


def retry_schedule(text: str) -> tuple[float, ...]:
    try:
        delays = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        delays = ()
    if not delays or any(d < 0 for d in delays):
        raise SystemExit(f"configuration error: MP4T_WEBHOOK_RETRY_SCHEDULE_S={text!r} must be comma-separated "
                         "seconds, e.g. 5,300,1800,7200,18000,36000,36000")
    return delays


def next_delay(schedule: tuple[float, ...], failed_attempts: int, rng: Callable[[], float] = random.random
               ) -> float | None:
    """Seconds until the attempt after ``failed_attempts`` failures (with up to 20 % jitter, never
    less than the schedule), or None when the schedule is used up (the delivery FAILS)."""
    if failed_attempts < 1 or failed_attempts > len(schedule):
        return None
    return schedule[failed_attempts - 1] * (1.0 + 0.2 * rng())


@dataclasses.dataclass(frozen=True)
class Attempt:
    delivery_id: str
    endpoint_id: str
    url: str
    msg_id: str
    body: str
    secrets: tuple[str, ...]
    attempt: int


@dataclasses.dataclass(frozen=True)
class Outcome:
    state: str
    retry_in_s: float | None = None


def _for_update(query: pw.ModelSelect) -> pw.ModelSelect:
    return query.for_update() if isinstance(database.obj, pw.PostgresqlDatabase) else query


def claim(delivery_id: str, lease_s: float, now: dt.datetime | None = None) -> Attempt | None:
    """Take a due delivery for one attempt (None: done, not due yet, or in flight elsewhere)."""
    now = now or utcnow()
    with locked():
        d = _for_update(WebhookDelivery.select().where(WebhookDelivery.id == delivery_id)).first()
        if d is None or d.state != PENDING:
            return None
        if d.next_attempt_time is not None and d.next_attempt_time > now + dt.timedelta(seconds=1):
            return None  # an early or duplicate message: the due one (or the sweep) comes later
        if d.claim_until is not None and d.claim_until > now:
            return None
        endpoint = WebhookEndpoint.get_by_id(d.endpoint_id)
        if endpoint.disabled:
            _set(d, state=FAILED, next_attempt_time=None, last_error="the endpoint is disabled", update_time=now)
            return None
        event = WebhookEvent.get_by_id(d.event_id)
        _set(d, attempts=d.attempts + 1, round_attempts=d.round_attempts + 1, last_attempt_time=now,
             claim_until=now + dt.timedelta(seconds=lease_s), update_time=now)
        return Attempt(d.id, endpoint.id, endpoint.url, webhook_id(event.id), event.body,
                       tuple(signing_secrets(endpoint, now)), d.attempts)


def _set(row: pw.Model, **fields: Any) -> None:
    for k, v in fields.items():
        setattr(row, k, v)
    row.save()


def complete(attempt: Attempt, status: int, error: str, schedule: tuple[float, ...],
             now: dt.datetime | None = None) -> Outcome | None:
    """Record an attempt's answer: 2xx SUCCEEDED; else the next attempt, or FAILED after the
    schedule (410 Gone: FAILED and the endpoint disabled). None if the delivery is gone."""
    now = now or utcnow()
    with locked():
        d = _for_update(WebhookDelivery.select().where(WebhookDelivery.id == attempt.delivery_id)).first()
        if d is None or d.state != PENDING:
            return None
        fields: dict[str, Any] = {"last_status_code": status, "claim_until": None, "update_time": now}
        if 200 <= status < 300:
            _set(d, state=SUCCEEDED, next_attempt_time=None, last_error="", **fields)
            return Outcome(SUCCEEDED)
        if status == 410:
            WebhookEndpoint.update(disabled=True, update_time=now,
                                   disabled_reason=f"the endpoint answered 410 Gone at {_iso(now)}").where(
                WebhookEndpoint.id == d.endpoint_id).execute()
            _set(d, state=FAILED, next_attempt_time=None, last_error=error + " (endpoint disabled)", **fields)
            return Outcome(FAILED)
        delay = next_delay(schedule, d.round_attempts)
        if delay is None:
            _set(d, state=FAILED, next_attempt_time=None,
                 last_error=f"{error} (gave up after {d.round_attempts} attempts)", **fields)
            return Outcome(FAILED)
        _set(d, next_attempt_time=now + dt.timedelta(seconds=delay), last_error=error, **fields)
        return Outcome(PENDING, delay)


def due(grace_s: float, limit: int = SWEEP_BATCH, now: dt.datetime | None = None) -> list[str]:
    """Deliveries due for more than ``grace_s`` and not in flight (their message was lost, or
    their retry was too far off for a delayed message): marked due now, returned to enqueue."""
    now = now or utcnow()
    with locked():
        rows = [r.id for r in WebhookDelivery.select(WebhookDelivery.id).where(
            WebhookDelivery.state == PENDING,
            WebhookDelivery.next_attempt_time <= now - dt.timedelta(seconds=grace_s),
            WebhookDelivery.claim_until.is_null() | (WebhookDelivery.claim_until < now)).limit(limit)]
        if rows:
            WebhookDelivery.update(next_attempt_time=now).where(WebhookDelivery.id.in_(rows)).execute()
    return rows


def prune(older_than: dt.timedelta, limit: int = SWEEP_BATCH) -> int:
    """Forget events older than ``older_than`` whose deliveries are all finished (the delivery log's
    retention); at most ``limit`` per call. Returns how many events went."""
    cutoff = utcnow() - older_than
    open_events = WebhookDelivery.select(WebhookDelivery.event).where(WebhookDelivery.state == PENDING)
    with locked():
        ids = [e.id for e in WebhookEvent.select(WebhookEvent.id).where(
            WebhookEvent.create_time < cutoff, WebhookEvent.id.not_in(open_events)).limit(limit)]
        if ids:
            WebhookDelivery.delete().where(WebhookDelivery.event.in_(ids)).execute()
            WebhookEvent.delete().where(WebhookEvent.id.in_(ids)).execute()
    return len(ids)


def redeliver(tenant_id: str, delivery_ids: list[str]) -> list[WebhookDelivery]:
    """Deliver these again now (same webhook-id, a fresh retry schedule), whatever their state."""
    now = utcnow()
    with outbox.sending(), locked():
        rows = list(_for_update(WebhookDelivery.select().where(WebhookDelivery.id.in_(delivery_ids),
                                                               WebhookDelivery.tenant == tenant_id)))
        for d in rows:
            _set(d, state=PENDING, round_attempts=0, next_attempt_time=now, update_time=now)
            outbox.add(ACTOR, d.id, PRIORITY)
    return rows


def rotate_secret(endpoint: WebhookEndpoint, grace_s: float) -> tuple[str, WebhookEndpoint]:
    """A new secret. The one it replaces keeps signing for ``grace_s`` -- unless an earlier
    rotation's grace period is still running: then that older secret stays the previous one, with
    its own expiry (a repeated rotation, e.g. a client's retry after a lost answer, must not
    drop the secret the receiver still verifies with for one it never saw)."""
    secret, now = new_secret(), utcnow()
    with locked():
        row = _for_update(WebhookEndpoint.select().where(WebhookEndpoint.id == endpoint.id)).first()
        if row is None:
            raise LookupError(endpoint.id)
        if len(signing_secrets(row, now)) > 1:  # the previous secret is still valid: keep it
            _set(row, secret=secret, update_time=now)
        else:
            _set(row, previous_secret=row.secret, secret=secret, update_time=now,
                 previous_secret_expire_time=now + dt.timedelta(seconds=grace_s))
    return secret, row


def deliveries_of_event(tenant_id: str, event_id: str) -> list[str]:
    with connection():
        return [d.id for d in WebhookDelivery.select(WebhookDelivery.id).where(
            WebhookDelivery.tenant == tenant_id, WebhookDelivery.event == event_id)]
