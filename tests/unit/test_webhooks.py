"""Webhooks without the stack: Standard Webhooks signatures checked by the independent
`standardwebhooks` package, the SSRF checker with the allow-list off, the retry schedule, the
delivery state machine on SQLite, events committed with the job's end, and one real HTTP
attempt against a receiver on loopback."""
from __future__ import annotations

import datetime as dt
import http.server
import json
import pathlib
import socket
import threading
from typing import Any, Iterator

import pytest
import standardwebhooks
from dramatiq.brokers.stub import StubBroker

from core import jobs, queue, runtime, webhooks
from mp4totext.config import Settings
from mp4totext.contracts import JobState, MediaState
from storage.db import Media, OutboxMessage, Tenant, Transcription, database, locked, utcnow
from storage.tenancy import WebhookDelivery, WebhookEndpoint, WebhookEvent

BODY = '{"type":"transcription.succeeded","timestamp":"2026-01-01T00:00:00Z","data":{"name":"transcriptions/x"}}'


# ---------------------------------------------------------------- signatures


def test_signatures_verify_with_the_standard_webhooks_library() -> None:
    secret = webhooks.new_secret()
    assert secret.startswith("whsec_")
    ts = int(utcnow().replace(tzinfo=dt.timezone.utc).timestamp())
    hdrs = webhooks.headers([secret], "msg_abc", ts, BODY)
    assert standardwebhooks.Webhook(secret).verify(BODY, hdrs)["data"]["name"] == "transcriptions/x"
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(BODY.replace("x", "y"), hdrs)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(webhooks.new_secret()).verify(BODY, hdrs)


def test_during_a_rotation_both_secrets_sign() -> None:
    old, new = webhooks.new_secret(), webhooks.new_secret()
    ts = int(utcnow().replace(tzinfo=dt.timezone.utc).timestamp())
    hdrs = webhooks.headers([new, old], "msg_abc", ts, BODY)
    assert len(hdrs["webhook-signature"].split(" ")) == 2
    for secret in (old, new):
        standardwebhooks.Webhook(secret).verify(BODY, hdrs)
    endpoint = WebhookEndpoint(secret=new, previous_secret=old,
                               previous_secret_expire_time=utcnow() + dt.timedelta(hours=24))
    assert webhooks.signing_secrets(endpoint, utcnow()) == [new, old]
    assert webhooks.signing_secrets(endpoint, utcnow() + dt.timedelta(hours=25)) == [new]


# ---------------------------------------------------------------- SSRF


@pytest.mark.parametrize("url", [
    "http://10.0.0.1/hook", "http://172.16.5.4/", "http://192.168.1.1/", "http://169.254.169.254/latest/meta-data",
    "http://127.0.0.1:8080/", "http://localhost/hook", "http://[::1]/", "http://[fd00::1]/", "http://[fe80::1]/",
    "http://224.0.0.1/", "http://0.0.0.0/", "http://[::ffff:127.0.0.1]/", "http://[::ffff:10.0.0.1]/",
    "http://100.64.0.1/", "http://[64:ff9b::a00:1]/", "http://[2002:a00:1::]/", "http://255.255.255.255/",
])
def test_non_public_targets_are_refused_without_an_allow_list(url: str) -> None:
    with pytest.raises(webhooks.TargetRefused, match="non-public address.*MP4T_WEBHOOK_ALLOW_NETS"):
        webhooks.resolve_target(url, ())


@pytest.mark.parametrize("url,why", [
    ("ftp://example.com/", "https://"), ("file:///etc/passwd", "https://"), ("", "required"),
    ("https://user:pw@example.com/", "user name"), ("http:///nohost", "no host"),
    ("https://example.com:99999/", "valid"),
])
def test_malformed_urls_are_refused(url: str, why: str) -> None:
    with pytest.raises(webhooks.TargetRefused, match=why):
        webhooks.resolve_target(url, ())


def test_public_targets_and_the_allow_list() -> None:
    assert webhooks.resolve_target("https://8.8.8.8/x", ()).addresses == ("8.8.8.8",)
    assert webhooks.resolve_target("https://[2606:4700::1111]/x", ()).port == 443
    loopback = webhooks.parse_nets("127.0.0.0/8")
    assert webhooks.resolve_target("http://127.0.0.1:9/x", loopback).addresses == ("127.0.0.1",)
    with pytest.raises(webhooks.TargetRefused):  # the allow-list opens only what it names
        webhooks.resolve_target("http://10.0.0.1/x", loopback)


def test_a_name_resolving_to_any_private_address_is_refused() -> None:
    def resolver(host: str, port: int) -> list[str]:
        return {"mixed.example": ["93.184.216.34", "10.1.2.3"], "ok.example": ["93.184.216.34"]}[host]

    with pytest.raises(webhooks.TargetRefused, match=r"'mixed.example' \(10.1.2.3\)"):
        webhooks.resolve_target("https://mixed.example/", (), resolver)
    assert webhooks.resolve_target("https://ok.example/", (), resolver).addresses == ("93.184.216.34",)

    def broken(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    with pytest.raises(webhooks.TargetRefused, match="does not resolve"):
        webhooks.resolve_target("https://nowhere.example/", (), broken)


def test_unknown_event_types_are_refused() -> None:
    assert webhooks.check_event_types(["media.failed", "media.failed"]) == ["media.failed"]
    with pytest.raises(webhooks.TargetRefused, match="transcription.succeeded"):
        webhooks.check_event_types(["transcription.done"])


# ---------------------------------------------------------------- schedule


def test_the_default_schedule_retries_for_more_than_a_day() -> None:
    schedule = webhooks.retry_schedule(Settings().webhook_retry_schedule_s)
    total = sum(webhooks.next_delay(schedule, n, rng=lambda: 0.0) for n in range(1, len(schedule) + 1))
    assert total >= 24 * 3600
    assert webhooks.next_delay(schedule, len(schedule) + 1) is None
    assert schedule[0] <= webhooks.next_delay(schedule, 1) <= schedule[0] * 1.2  # jitter never shortens a wait


# ---------------------------------------------------------------- the state machine (SQLite)


@pytest.fixture()
def broker(tmp_path: pathlib.Path) -> Iterator[StubBroker]:
    settings = Settings(data_dir=str(tmp_path), broker_url="memory", webhook_allow_nets="127.0.0.0/8")
    runtime.init(settings)
    yield queue.make_broker(settings)
    database.close()


def _tenant_with(*endpoints: dict[str, Any]) -> tuple[Tenant, list[WebhookEndpoint]]:
    with database.connection_context():
        tenant = Tenant.create(name="hooks")
        rows = [WebhookEndpoint.create(tenant=tenant, url="http://127.0.0.1:9/", secret=webhooks.new_secret(), **e)
                for e in endpoints]
    return tenant, rows


def _job(tenant: Tenant) -> Transcription:
    with database.connection_context():
        media = Media.create(tenant=tenant, object_key="k", state=MediaState.READY, duration_s=3.0)
        return Transcription.create(tenant=tenant, media=media, state=JobState.QUEUED)


def _rows(model: Any) -> list[Any]:
    with database.connection_context():
        return list(model.select())


def test_a_job_end_commits_its_event_for_subscribed_enabled_endpoints_only(broker: StubBroker) -> None:
    tenant, (all_events, only_failed, wanted, off) = _tenant_with(
        {}, {"event_types": ["transcription.failed"]}, {"event_types": ["transcription.cancelled"]},
        {"disabled": True})
    job = _job(tenant)
    assert jobs.finish(job.id, JobState.CANCELLED, reason="CANCELLED", message="cancelled by the client")
    (event,) = _rows(WebhookEvent)
    body = json.loads(event.body)
    assert body["type"] == "transcription.cancelled"
    assert body["data"]["name"] == f"transcriptions/{job.id}" and body["data"]["state"] == "CANCELLED"
    assert body["data"]["error"]["reason"] == "CANCELLED"
    deliveries = _rows(WebhookDelivery)
    assert {d.endpoint_id for d in deliveries} == {all_events.id, wanted.id}
    assert sorted(m.object_id for m in _rows(OutboxMessage) if m.actor == webhooks.ACTOR) == sorted(
        d.id for d in deliveries)


def test_a_rolled_back_change_leaves_no_event(broker: StubBroker) -> None:
    tenant, _ = _tenant_with({})
    job = _job(tenant)
    with pytest.raises(RuntimeError):
        with locked():
            row = Transcription.get_by_id(job.id)
            jobs._finish(row, JobState.FAILED, reason="X", message="boom")
            raise RuntimeError("rolled back")
    assert _rows(WebhookEvent) == [] and _rows(WebhookDelivery) == [] and _rows(OutboxMessage) == []


def test_media_failure_is_an_event(broker: StubBroker) -> None:
    tenant, _ = _tenant_with({"event_types": ["media.failed"]})
    with database.connection_context():
        media = Media.create(tenant=tenant, object_key="k", state=MediaState.PROCESSING, filename="a.mp4")
    jobs.media_failed(media.id, "not a media file")
    jobs.media_failed(media.id, "again")  # already FAILED: no second event
    (event,) = _rows(WebhookEvent)
    assert json.loads(event.body)["data"] == {"name": f"media/{media.id}", "state": "FAILED", "owner": "",
                                              "filename": "a.mp4",
                                              "error": {"reason": "MEDIA_INVALID", "message": "not a media file"}}


def test_ai_items_ending_are_events(broker: StubBroker) -> None:
    from core import enhancements
    from storage.db import Enhancement

    tenant, _ = _tenant_with({"event_types": ["enhancement.succeeded", "enhancement.failed"]})
    job, other = _job(tenant), _job(tenant)
    with database.connection_context():
        done = Enhancement.create(tenant=tenant, transcription=job, kind="SUMMARY", state="RUNNING")
        waiting = Enhancement.create(tenant=tenant, transcription=other, kind="CLEANUP", state="PENDING")
        Transcription.update(ai_items=1).where(Transcription.id.in_([job.id, other.id])).execute()
    assert enhancements.finish(done.id, None, "SUCCEEDED", result={"summary": "s"})
    jobs.finish(other.id, JobState.FAILED, reason="X", message="boom")  # its waiting item ends with it
    bodies = {json.loads(e.body)["type"]: json.loads(e.body)["data"] for e in _rows(WebhookEvent)}
    assert set(bodies) == {"enhancement.succeeded", "enhancement.failed"}  # transcription.* not subscribed
    assert bodies["enhancement.succeeded"]["enhancement_id"] == done.id
    assert bodies["enhancement.succeeded"]["name"] == f"transcriptions/{job.id}"
    assert bodies["enhancement.failed"]["enhancement_id"] == waiting.id
    assert bodies["enhancement.failed"]["error"]["reason"] == "TRANSCRIPTION_FAILED"


def _one_delivery(broker: StubBroker) -> WebhookDelivery:
    tenant, _ = _tenant_with({})
    jobs.finish(_job(tenant).id, JobState.SUCCEEDED)
    (delivery,) = _rows(WebhookDelivery)
    return delivery


def test_retries_follow_the_schedule_then_fail(broker: StubBroker) -> None:
    delivery = _one_delivery(broker)
    schedule = (10.0, 20.0)
    now = utcnow()
    first = webhooks.claim(delivery.id, 30, now)
    assert first is not None and first.msg_id.startswith("msg_")
    assert webhooks.claim(delivery.id, 30, now) is None  # in flight: a duplicate message does nothing
    outcome = webhooks.complete(first, 500, "HTTP 500", schedule, now)
    assert outcome.state == "PENDING" and 10 <= outcome.retry_in_s <= 12
    assert webhooks.claim(delivery.id, 30, now) is None  # not due yet
    later = now + dt.timedelta(seconds=13)
    second = webhooks.claim(delivery.id, 30, later)
    assert second.msg_id == first.msg_id and second.body == first.body  # the same webhook-id and bytes
    assert webhooks.complete(second, 0, "ConnectError", schedule, later).state == "PENDING"
    last = later + dt.timedelta(seconds=25)
    third = webhooks.claim(delivery.id, 30, last)
    assert webhooks.complete(third, 503, "HTTP 503", schedule, last).state == "FAILED"
    (row,) = _rows(WebhookDelivery)
    assert (row.state, row.attempts, row.last_status_code) == ("FAILED", 3, 503)
    assert "gave up after 3 attempts" in row.last_error
    again = webhooks.redeliver(row.tenant_id, [row.id])  # a fresh schedule, the same webhook-id
    assert again[0].state == "PENDING"
    fourth = webhooks.claim(row.id, 30, utcnow())
    assert fourth.msg_id == first.msg_id
    assert webhooks.complete(fourth, 204, "", schedule).state == "SUCCEEDED"


def test_410_gone_disables_the_endpoint(broker: StubBroker) -> None:
    delivery = _one_delivery(broker)
    attempt = webhooks.claim(delivery.id, 30)
    assert webhooks.complete(attempt, 410, "HTTP 410", (1.0,)).state == "FAILED"
    (endpoint,) = _rows(WebhookEndpoint)
    assert endpoint.disabled and "410 Gone" in endpoint.disabled_reason


def test_the_sweep_recovers_a_lost_or_abandoned_attempt(broker: StubBroker) -> None:
    delivery = _one_delivery(broker)
    with database.connection_context():
        OutboxMessage.delete().execute()  # the message is lost
    now = utcnow()
    assert webhooks.due(30, now=now) == []  # its own message gets a grace period
    assert webhooks.due(30, now=now + dt.timedelta(seconds=31)) == [delivery.id]
    webhooks.claim(delivery.id, 60, now + dt.timedelta(seconds=31))  # a worker took it and died
    assert webhooks.due(30, now=now + dt.timedelta(seconds=62)) == []  # still leased
    assert webhooks.due(30, now=now + dt.timedelta(seconds=125)) == [delivery.id]


# ---------------------------------------------------------------- one real attempt


class _Receiver(http.server.BaseHTTPRequestHandler):
    answers: list[int] = []
    seen: list[tuple[dict[str, str], str]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["content-length"])).decode()
        self.seen.append(({k.lower(): v for k, v in self.headers.items()} | {":path": self.path}, body))
        status = self.answers.pop(0) if self.answers else 200
        self.send_response(status)
        if status == 302:
            self.send_header("location", "http://169.254.169.254/")
        self.send_header("content-length", "4")
        self.end_headers()
        self.wfile.write(b"nope")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def receiver() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.answers, _Receiver.seen = [], []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_address[1]}/hooks?x=1"
    server.shutdown()
    server.server_close()


def test_one_attempt_is_signed_and_never_follows_a_redirect(broker: StubBroker, receiver: str) -> None:
    from workers import webhooks as sender

    secret = webhooks.new_secret()
    attempt = webhooks.Attempt("d", "e", receiver, "msg_1", BODY, (secret,), 1)
    s = runtime.get().settings
    assert sender.post(attempt, s) == (200, "")
    headers, body = _Receiver.seen[0]
    assert body == BODY and headers["host"] == receiver.split("/")[2] and headers[":path"] == "/hooks?x=1"
    standardwebhooks.Webhook(secret).verify(body, headers)
    _Receiver.answers = [302]
    assert sender.post(attempt, s) == (302, "HTTP 302: nope")
    assert len(_Receiver.seen) == 2  # the redirect target was not asked
    status, error = sender.post(attempt, Settings(webhook_allow_nets=""))  # loopback not allowed: refused
    assert status == 0 and error.startswith("refused:") and len(_Receiver.seen) == 2


def test_the_cli_offers_the_event_types_the_server_knows() -> None:
    from mp4totext import cli_webhooks

    assert cli_webhooks.EVENT_TYPES == webhooks.EVENT_TYPES


def test_the_log_forgets_old_finished_events_only(broker: StubBroker) -> None:
    delivery = _one_delivery(broker)
    later = dt.timedelta(days=-1)  # "older than minus a day": everything is old enough
    assert webhooks.prune(later) == 0  # still PENDING: kept
    webhooks.complete(webhooks.claim(delivery.id, 30), 200, "", (1.0,))
    assert webhooks.prune(dt.timedelta(days=30)) == 0  # finished, but recent
    assert webhooks.prune(later) == 1
    assert _rows(WebhookDelivery) == [] and _rows(WebhookEvent) == []


# ---------------------------------------------------------------- review fixes (issue 13)


def test_a_repeated_rotation_keeps_the_secret_receivers_still_verify_with(broker: StubBroker) -> None:
    _, (endpoint,) = _tenant_with({})
    original = endpoint.secret
    webhooks.rotate_secret(endpoint, 3600)  # its answer is lost: the client retries
    second, row = webhooks.rotate_secret(endpoint, 3600)
    assert row.secret == second and row.previous_secret == original
    assert webhooks.signing_secrets(row, utcnow()) == [second, original]
    first_expiry = row.previous_secret_expire_time  # the grace period is the first rotation's, not extended
    assert (first_expiry - utcnow()).total_seconds() <= 3600
    with database.connection_context():  # once that grace period is over, a rotation retires the current one
        WebhookEndpoint.update(previous_secret_expire_time=utcnow() - dt.timedelta(seconds=1)).execute()
    third, row = webhooks.rotate_secret(endpoint, 3600)
    assert row.previous_secret == second and webhooks.signing_secrets(row, utcnow()) == [third, second]


def test_a_cancelled_waiting_item_event_names_the_owner(broker: StubBroker) -> None:
    from core import enhancements
    from storage.db import Enhancement

    tenant, _ = _tenant_with({"event_types": ["enhancement.cancelled"]})
    job = _job(tenant)
    with database.connection_context():
        Transcription.update(owner="alice", ai_items=1).where(Transcription.id == job.id).execute()
        item = Enhancement.create(tenant=tenant, transcription=job, kind="SUMMARY", state="PENDING")
    assert enhancements.request_cancel(job.id) == 1
    (event,) = _rows(WebhookEvent)
    data = json.loads(event.body)["data"]
    assert (data["enhancement_id"], data["state"], data["owner"]) == (item.id, "CANCELLED", "alice")


def test_an_idn_host_is_resolved_and_sent_in_its_ascii_form(broker: StubBroker, receiver: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from workers import webhooks as sender

    real = socket.getaddrinfo

    def fake(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        return real("127.0.0.1" if host == "xn--bcher-kva.test" else host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    port = receiver.split("/")[2].split(":")[1]
    url = f"http://Bücher.test:{port}/hooks"
    assert webhooks.check_url(url) == ("http", "xn--bcher-kva.test", int(port))
    attempt = webhooks.Attempt("d", "e", url, "msg_1", BODY, (webhooks.new_secret(),), 1)
    assert sender.post(attempt, runtime.get().settings) == (200, "")
    assert _Receiver.seen[0][0]["host"] == f"xn--bcher-kva.test:{port}"
    with pytest.raises(webhooks.TargetRefused, match="internationalised"):
        webhooks.check_url("http://" + "ü" * 70 + ".test/")  # no IDNA form: a label over 63 characters


def test_an_attempt_that_breaks_unexpectedly_is_a_failed_attempt(broker: StubBroker, receiver: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the HTTP client raises, the delivery records the attempt and keeps its schedule."""
    import httpx

    from workers import webhooks as sender

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise UnicodeEncodeError("ascii", "ü", 0, 1, "ordinal not in range(128)")

    monkeypatch.setattr(httpx.Client, "stream", broken)
    attempt = webhooks.Attempt("d", "e", receiver, "msg_1", BODY, (webhooks.new_secret(),), 1)
    status, error = sender.post(attempt, runtime.get().settings)
    assert status == 0 and error.startswith("UnicodeEncodeError")
    tenant, (endpoint,) = _tenant_with({})
    with database.connection_context():
        WebhookEndpoint.update(url=receiver).execute()
    jobs.finish(_job(tenant).id, JobState.SUCCEEDED)
    (delivery,) = _rows(WebhookDelivery)
    sender.deliver(delivery.id)  # the actor: no exception, the answer recorded, the next attempt scheduled
    (row,) = _rows(WebhookDelivery)
    assert (row.state, row.attempts, row.claim_until) == ("PENDING", 1, None)
    assert row.last_error.startswith("UnicodeEncodeError") and row.next_attempt_time > utcnow()
