"""Webhooks against the real stack (2 servers, workers, RabbitMQ, PostgreSQL, S3): a receiver in
this process checks every delivery with the independent `standardwebhooks` package.

The stack allows loopback targets (MP4T_WEBHOOK_ALLOW_NETS=127.0.0.0/8) and retries on a
seconds-long schedule (MP4T_WEBHOOK_RETRY_SCHEDULE_S=0.5,1,2,4: five attempts, then FAILED).
Every test uses its own receiver path and deletes its endpoint, on a tenant of its own.
"""
from __future__ import annotations

import http.server
import json
import pathlib
import subprocess
import threading
import time
import uuid
from typing import Any, Iterator

import grpc
import pytest
import standardwebhooks

from mp4totext.client import Client
from mp4totext.v1 import transcription_pb2 as tpb
from mp4totext.v1 import webhooks_pb2 as wpb
from tests.support import CLI, ROOT, Stack, wait_for

SUCCEEDED, FAILED = wpb.WEBHOOK_DELIVERY_STATE_SUCCEEDED, wpb.WEBHOOK_DELIVERY_STATE_FAILED


class Receiver:
    """An HTTP server on loopback: records every POST by path; answers what a test scripted."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.got: dict[str, list[dict[str, Any]]] = {}
        self.script: dict[str, list[int]] = {}
        self.always: dict[str, int] = {}
        self.hold: dict[str, threading.Event] = {}  # answer only once it is set
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0"))).decode()
                with owner.lock:
                    queued = owner.script.get(self.path) or []
                    status = queued.pop(0) if queued else owner.always.get(self.path, 200)
                    owner.got.setdefault(self.path, []).append(
                        {"headers": {k.lower(): v for k, v in self.headers.items()}, "body": body,
                         "status": status, "time": time.monotonic()})
                held = owner.hold.get(self.path)
                if held is not None:
                    held.wait(120)
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True).start()

    def received(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.got.get(path, []))

    def wait(self, path: str, n: int, timeout: float = 60) -> list[dict[str, Any]]:
        return wait_for(lambda: len(got := self.received(path)) >= n and got, timeout, f"{n} POSTs to {path}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture(scope="module")
def hooks_key(db: Any) -> str:
    from server.auth import create_key

    return create_key(f"tenant-hooks-{uuid.uuid4().hex[:6]}")[0]


@pytest.fixture()
def hc(stack: Stack, hooks_key: str) -> Iterator[Client]:
    with Client(stack.target, hooks_key) as c:
        yield c


@pytest.fixture()
def endpoint(hc: Client, receiver: Receiver, request: pytest.FixtureRequest) -> Iterator[Any]:
    """``endpoint(*event_types)`` -> (endpoint name, secret, receiver path); deleted after the test."""
    made: list[str] = []

    def make(*event_types: str) -> tuple[str, str, str]:
        path = f"/{request.node.name}-{len(made)}"
        created = hc.create_webhook(receiver.base + path, list(event_types), description="test")
        assert created.secret.startswith("whsec_")
        made.append(created.webhook_endpoint.name)
        return created.webhook_endpoint.name, created.secret, path

    try:
        yield make
    finally:
        for name in made:
            hc.call(hc.webhooks.DeleteWebhookEndpoint, wpb.DeleteWebhookEndpointRequest(name=name))


def verified(post: dict[str, Any], *secrets: str) -> dict[str, Any]:
    """The body, after checking its signature with each secret (the independent implementation)."""
    for secret in secrets:
        standardwebhooks.Webhook(secret).verify(post["body"], post["headers"])
    return json.loads(post["body"])


def upload_bytes(client: Client, tmp_path: pathlib.Path, data: bytes, name: str = "broken.mp4") -> str:
    path = tmp_path / f"{uuid.uuid4().hex}-{name}"
    path.write_bytes(data)
    return client.upload(str(path), content_type="video/mp4").name


def delivery_log(client: Client, endpoint: str, state: int) -> list[wpb.WebhookDelivery]:
    return wait_for(lambda: [d for d in client.webhook_deliveries(endpoint) if d.state == state] or None, 60,
                    f"a {wpb.WebhookDeliveryState.Name(state)} delivery of {endpoint}", 0.2)


# ---------------------------------------------------------------- the API's guards


def test_targets_are_checked_for_ssrf_at_creation(hc: Client) -> None:
    for url in ("http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data", "http://[fd00::1]/",
                "http://192.168.0.10/", "ftp://example.com/"):
        with pytest.raises(grpc.RpcError) as err:
            hc.create_webhook(url, ["transcription.succeeded"])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, url
        assert "webhook_endpoint.url" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        hc.create_webhook("http://127.0.0.1:9/", ["transcription.finished"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "transcription.succeeded" in err.value.details()


def test_only_the_tenant_key_manages_webhooks(hc: Client, client_b: Client, stack: Stack,
                                              endpoint: Any) -> None:
    name, _, _ = endpoint("transcription.succeeded")
    with pytest.raises(grpc.RpcError) as err:  # another tenant: not found, as if it did not exist
        client_b.call(client_b.webhooks.GetWebhookEndpoint, wpb.GetWebhookEndpointRequest(name=name))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert name not in [e.name for e in client_b.list_webhooks()]
    token = hc.create_user_token("user-1").token
    with Client(stack.target, token) as user:  # an end user's app: never the tenant's admin
        for call in (lambda: user.list_webhooks(), lambda: user.create_webhook("http://127.0.0.1:9/"),
                     lambda: user.webhook_deliveries()):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    got = hc.call(hc.webhooks.GetWebhookEndpoint, wpb.GetWebhookEndpointRequest(name=name))
    assert got.description == "test" and not got.disabled


def test_a_retried_creation_gets_the_secret_again(hc: Client, client_b: Client, receiver: Receiver) -> None:
    request_id = uuid.uuid4().hex
    first = hc.create_webhook(receiver.base + "/retried-creation", ["media.failed"], request_id=request_id)
    try:
        again = hc.create_webhook(receiver.base + "/retried-creation", ["media.failed"], request_id=request_id)
        assert again.webhook_endpoint.name == first.webhook_endpoint.name
        assert again.secret == first.secret and first.secret.startswith("whsec_")
        other = client_b.create_webhook(receiver.base + "/retried-creation", request_id=request_id)
        try:  # another tenant's request_id space: its own endpoint and secret
            assert other.webhook_endpoint.name != first.webhook_endpoint.name and other.secret != first.secret
        finally:
            client_b.call(client_b.webhooks.DeleteWebhookEndpoint,
                          wpb.DeleteWebhookEndpointRequest(name=other.webhook_endpoint.name))
    finally:
        hc.call(hc.webhooks.DeleteWebhookEndpoint, wpb.DeleteWebhookEndpointRequest(name=first.webhook_endpoint.name))


# ---------------------------------------------------------------- events


def test_a_succeeded_transcription_is_delivered_once_signed(hc: Client, receiver: Receiver, speech_mp4: Any,
                                                             endpoint: Any) -> None:
    name, secret, path = endpoint("transcription.succeeded")
    media = hc.upload(str(speech_mp4), content_type="video/mp4")
    job = hc.create(media.name, language_code="en")
    assert hc.wait(job.name, timeout=300).state == tpb.TRANSCRIPTION_STATE_SUCCEEDED
    (post,) = receiver.wait(path, 1)
    event = verified(post, secret)
    assert event["type"] == "transcription.succeeded"
    assert event["data"]["name"] == job.name and event["data"]["media"] == media.name
    assert event["data"]["state"] == "SUCCEEDED" and event["data"]["owner"] == ""
    (delivery,) = delivery_log(hc, name, SUCCEEDED)
    assert (delivery.attempt_count, delivery.last_status_code) == (1, 200)
    assert post["headers"]["webhook-id"] == delivery.webhook_id == "msg_" + delivery.event.split("/")[1]
    assert len(receiver.received(path)) == 1


def test_failed_media_failed_and_cancelled_jobs_are_delivered(hc: Client, receiver: Receiver, speech_mp4: Any,
                                                              tmp_path: pathlib.Path,
                                                              endpoint: Any) -> None:
    name, secret, path = endpoint("media.failed", "transcription.failed", "transcription.cancelled")
    # A job waiting for media that turns out broken fails with it (created while the worker probes it).
    for _ in range(5):
        broken = upload_bytes(hc, tmp_path, b"\x00not a video\xff" * 400_000)
        try:
            failing = hc.create(broken, language_code="en")
            break
        except grpc.RpcError as exc:  # the worker was faster: the media is FAILED already
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    else:
        pytest.fail("the broken media failed before a transcription could wait for it, five times")
    cancelled = hc.create(hc.upload(str(speech_mp4), content_type="video/mp4").name, language_code="en")
    hc.call(hc.transcriptions.CancelTranscription, tpb.CancelTranscriptionRequest(name=cancelled.name))
    posts = receiver.wait(path, 3, timeout=120)
    events = {(e := verified(p, secret))["type"]: e["data"] for p in posts}
    assert events["media.failed"]["name"] == broken and events["media.failed"]["error"]["reason"] == "MEDIA_INVALID"
    assert events["transcription.failed"]["name"] == failing.name
    assert events["transcription.failed"]["error"]["reason"] == "MEDIA_INVALID"
    assert events["transcription.cancelled"]["name"] == cancelled.name
    assert len({p["headers"]["webhook-id"] for p in posts}) == 3


def test_retries_keep_the_webhook_id_and_redelivery_reuses_it(hc: Client, receiver: Receiver, tmp_path: pathlib.Path,
                                                               endpoint: Any) -> None:
    name, secret, path = endpoint("media.failed")
    receiver.script[path] = [500, 500]
    upload_bytes(hc, tmp_path, b"junk" * 100)
    posts = receiver.wait(path, 3)
    assert [p["status"] for p in posts] == [500, 500, 200]
    assert len({p["headers"]["webhook-id"] for p in posts}) == 1
    assert len({p["body"] for p in posts}) == 1  # the same bytes every time
    assert posts[1]["time"] - posts[0]["time"] >= 0.45  # backed off (first delay 0.5 s)
    for p in posts:
        verified(p, secret)
    (delivery,) = delivery_log(hc, name, SUCCEEDED)
    assert (delivery.attempt_count, delivery.last_status_code, delivery.last_error) == (3, 200, "")
    # Redelivery: by the delivery, then by the event: the same webhook-id again.
    (again,) = hc.redeliver_webhook(delivery.name)
    assert again.state == wpb.WEBHOOK_DELIVERY_STATE_PENDING
    receiver.wait(path, 4)
    wait_for(lambda: hc.webhook_deliveries(name)[0].state == SUCCEEDED, 30, "the redelivery done")
    hc.redeliver_webhook(delivery.event)
    more = receiver.wait(path, 5)[3:]
    assert {p["headers"]["webhook-id"] for p in more} == {delivery.webhook_id}
    wait_for(lambda: hc.webhook_deliveries(name)[0].attempt_count == 5, 30, "5 attempts in the log")


def test_a_receiver_that_keeps_failing_ends_failed_after_the_schedule(hc: Client, receiver: Receiver,
                                                                       tmp_path: pathlib.Path,
                                                                       endpoint: Any) -> None:
    name, _, path = endpoint("media.failed")
    receiver.always[path] = 503
    upload_bytes(hc, tmp_path, b"junk" * 100)
    (delivery,) = delivery_log(hc, name, FAILED)
    assert delivery.attempt_count == 5 and delivery.last_status_code == 503  # 1 + the 4 retries of the schedule
    assert "gave up after 5 attempts" in delivery.last_error
    assert len(receiver.received(path)) == 5
    assert hc.webhook_deliveries(name, event=delivery.event)[0].name == delivery.name


def test_after_a_rotation_both_secrets_sign(hc: Client, receiver: Receiver, tmp_path: pathlib.Path,
                                            endpoint: Any) -> None:
    name, old, path = endpoint("media.failed")
    lost = hc.call(hc.webhooks.RotateWebhookSecret, wpb.RotateWebhookSecretRequest(name=name))
    rotated = hc.call(hc.webhooks.RotateWebhookSecret, wpb.RotateWebhookSecretRequest(name=name))  # a retry
    assert rotated.secret.startswith("whsec_") and rotated.secret not in (old, lost.secret)
    assert rotated.previous_secret_expire_time.seconds > time.time() + 23 * 3600
    assert rotated.previous_secret_expire_time == lost.previous_secret_expire_time  # the old secret's, as it was
    upload_bytes(hc, tmp_path, b"junk" * 100)
    (post,) = receiver.wait(path, 1)
    assert len(post["headers"]["webhook-signature"].split(" ")) == 2
    assert verified(post, old, rotated.secret)["type"] == "media.failed"  # the receiver's secret still verifies
    updated = hc.call(hc.webhooks.UpdateWebhookEndpoint, wpb.UpdateWebhookEndpointRequest(
        webhook_endpoint=wpb.WebhookEndpoint(name=name, disabled=True), update_mask={"paths": ["disabled"]}))
    assert updated.disabled
    with pytest.raises(grpc.RpcError) as err:
        hc.redeliver_webhook(hc.webhook_deliveries(name)[0].name)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_an_attempt_cut_by_a_worker_crash_is_sent_again(hc: Client, receiver: Receiver, stack: Stack,
                                                        tmp_path: pathlib.Path, endpoint: Any) -> None:
    """The schedule lives in the database: the crashed worker's redelivered message finds the
    attempt leased and drops it; the maintenance sweep sends it once the lease is over."""
    name, secret, path = endpoint("media.failed")
    receiver.hold[path] = threading.Event()
    upload_bytes(hc, tmp_path, b"junk" * 100)
    (first,) = receiver.wait(path, 1)
    stack.workers.pop("critical,low").kill()
    stack.start_worker("critical,low")
    receiver.hold[path].set()
    second = receiver.wait(path, 2, timeout=150)[1]
    assert second["headers"]["webhook-id"] == first["headers"]["webhook-id"] and second["body"] == first["body"]
    verified(second, secret)
    (delivery,) = delivery_log(hc, name, SUCCEEDED)
    assert delivery.attempt_count == 2


def test_the_cli_manages_webhooks(stack: Stack, hooks_key: str, hc: Client, receiver: Receiver,
                                  tmp_path: pathlib.Path) -> None:
    def cli(*args: str) -> Any:
        done = subprocess.run([*CLI, "webhooks", *args, "--server", stack.target, "--api-key", hooks_key],
                              capture_output=True, text=True, cwd=ROOT, timeout=60, stdin=subprocess.DEVNULL)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout) if done.stdout.lstrip().startswith(("{", "[")) else done.stdout

    created = cli("create", receiver.base + "/cli", "--events", "media.failed", "--description", "from the cli")
    name = created["name"]
    try:
        assert created["secret"].startswith("whsec_") and created["event_types"] == ["media.failed"]
        assert name in [e["name"] for e in cli("list")]
        upload_bytes(hc, tmp_path, b"junk" * 100)
        (post,) = receiver.wait("/cli", 1)
        verified(post, created["secret"])
        (delivery,) = wait_for(lambda: [d for d in cli("deliveries", "--endpoint", name)
                                        if d["state"] == "WEBHOOK_DELIVERY_STATE_SUCCEEDED"], 60, "the log")
        (again,) = cli("redeliver", delivery["name"])
        assert again["webhook_id"] == post["headers"]["webhook-id"]
        assert receiver.wait("/cli", 2)[1]["headers"]["webhook-id"] == again["webhook_id"]
    finally:
        assert cli("delete", name).strip() == f"deleted {name}"
