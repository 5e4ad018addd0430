"""The AI layer against an LLM server that behaves as a busy hosted API does: rate limits with
Retry-After, slow answers. The real server (llama-cpp-python + SmolLM2-135M) sits behind a
loopback proxy (tests/support/llm_proxy.py) that injects those answers and counts what arrives;
every answer the workers use is still the model's own.

Covered here: Retry-After honoured, rate-limited answers counted in the metrics, the per-process
cap on requests in flight, the item time limit (item FAILED, transcript kept).
"""
from __future__ import annotations

import itertools
import pathlib
from typing import Any, Iterator

import grpc
import pytest

from mp4totext.client import Client, enhancement_requests
from mp4totext.v1 import transcription_pb2 as tpb
from tests.e2e.test_ai import item, llm_env
from tests.support import Stack
from tests.support.llm_proxy import LLMProxy
from tests.support.metrics import metric_delta

pytestmark = pytest.mark.slow

K = tpb.EnhancementKind
S = tpb.EnhancementState


@pytest.fixture(scope="module")
def proxy(llm_server: Any) -> Iterator[LLMProxy]:
    p = LLMProxy(llm_server.base_url)
    yield p
    p.stop()


@pytest.fixture(scope="module")
def worker_env(proxy: LLMProxy, llm_server: Any) -> dict[str, str]:
    # Three items at once in one worker process, at most one LLM request in flight.
    return llm_env(llm_server, MP4T_LLM_BASE_URL=proxy.base_url, MP4T_WORKER_THREADS="3",
                   MP4T_LLM_MAX_CONCURRENCY="1")


@pytest.fixture(scope="module")
def proxied_worker(stack: Stack, worker_env: dict[str, str]) -> Iterator[Any]:
    proc = stack.restart_worker("default", **worker_env)
    yield proc
    current = stack.workers.pop("default", None)
    if current is not None:
        current.stop()


@pytest.fixture(scope="module")
def done_job(stack: Stack, key_a: str, speech_mp4: pathlib.Path, proxied_worker: Any) -> tpb.Transcription:
    with Client(stack.target, key_a) as c:
        job = c.wait(c.create(c.upload(str(speech_mp4)).name).name)
    assert job.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED and job.result.segments
    return job


def _translate_through_refusals(stack: Stack, client: Client, proxy: LLMProxy, worker: Any, job: tpb.Transcription,
                                lang: str, status: int, n: int) -> tuple[tpb.Enhancement, Any, Any]:
    proxy.reset()
    proxy.refuse_next(n, status, retry_after_s=2)
    before = stack.metrics(worker)
    client.enhance(job.name, enhancement_requests(translate=[lang]))
    client.wait(job.name, timeout=300)
    e = item(client.get(job.name), K.ENHANCEMENT_KIND_TRANSLATION, lang)
    assert e.state == S.ENHANCEMENT_STATE_SUCCEEDED, e.error_message
    assert e.attempt_count == 1, e  # waiting for the server counts no attempt
    statuses = [s.status for s in proxy.seen]  # (a server refusing a JSON mode adds its own 500 once)
    assert statuses[:n] == [status] * n and statuses[n] != status and statuses[-1] == 200, statuses
    gaps = [b.at - a.at for a, b in itertools.pairwise(proxy.seen[:n + 1])]
    assert all(g >= 1.95 for g in gaps), f"Retry-After not honoured: tries {gaps} s apart"
    return e, before, stack.metrics(worker)


def test_rate_limits_are_waited_out_as_the_server_asks(stack: Stack, client: Client, proxy: LLMProxy,
                                                      proxied_worker: Any, done_job: tpb.Transcription) -> None:
    """429s and 503s with Retry-After: 2 s: each new try comes 2 s later (the backoff would be
    under a second), the item succeeds without an attempt counted, and the metrics count the
    refusals. The worker's first request goes without the client's retries (it is finding out
    which JSON mode the server takes), so there the runner waits: the item's message comes back
    after the Retry-After; once the mode is known the client waits itself, in one request of ours."""
    first, before, after = _translate_through_refusals(stack, client, proxy, proxied_worker, done_job, "es", 429, 2)
    assert metric_delta(before, after, "mp4t_llm_responses_total", code="429") == 2
    answered = metric_delta(before, after, "mp4t_llm_requests_total", outcome="invalid_output") + 1  # (+ repairs)
    assert metric_delta(before, after, "mp4t_llm_requests_total", outcome="rate_limited") == \
        first.request_count - answered
    assert metric_delta(before, after, "mp4t_llm_requests_total", outcome="ok") == 1
    assert metric_delta(before, after, "mp4t_llm_tokens_total", direction="prompt") == first.usage.prompt_tokens
    second, before, after = _translate_through_refusals(stack, client, proxy, proxied_worker, done_job, "pt", 503, 2)
    answered = metric_delta(before, after, "mp4t_llm_requests_total", outcome="invalid_output") + 1  # (+ repairs)
    assert second.request_count == answered, second  # the client's own retries, none of ours
    assert metric_delta(before, after, "mp4t_llm_responses_total", code="503") == 2
    assert metric_delta(before, after, "mp4t_llm_requests_total", outcome="ok") == 1
    assert metric_delta(before, after, "mp4t_llm_request_seconds_count") == answered


def test_requests_in_flight_are_capped_per_process(client: Client, proxy: LLMProxy, proxied_worker: Any,
                                                   done_job: tpb.Transcription) -> None:
    """Three items run at once on three worker threads; with MP4T_LLM_MAX_CONCURRENCY=1 the
    server never has more than one of their requests at a time."""
    proxy.reset()
    proxy.delay_s = 1.0
    client.enhance(done_job.name, enhancement_requests(cleanup=True, translate=["it"], summary=True))
    client.wait(done_job.name, timeout=600)
    job = client.get(done_job.name)
    items = [item(job, K.ENHANCEMENT_KIND_CLEANUP), item(job, K.ENHANCEMENT_KIND_TRANSLATION, "it"),
             item(job, K.ENHANCEMENT_KIND_SUMMARY)]
    assert all(e.state == S.ENHANCEMENT_STATE_SUCCEEDED for e in items), items
    spans = sorted((e.start_time.ToDatetime(), e.end_time.ToDatetime()) for e in items)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)), \
        f"the items did not run at the same time, so the cap was not exercised: {spans}"
    assert len(proxy.seen) >= 3 and proxy.max_in_flight == 1, (len(proxy.seen), proxy.max_in_flight)


def test_time_limit_fails_the_item_and_keeps_the_transcript(stack: Stack, client: Client, proxy: LLMProxy,
                                                            worker_env: dict[str, str],
                                                            done_job: tpb.Transcription) -> None:
    proxy.reset()
    proxy.delay_s = 6.0
    worker = stack.restart_worker("default", **{**worker_env, "MP4T_AI_TIME_LIMIT_S": "3"})
    try:
        before = stack.metrics(worker)
        client.enhance(done_job.name, enhancement_requests(translate=["nl"]))
        client.wait(done_job.name, timeout=120)
        after = stack.metrics(worker)
    finally:
        proxy.delay_s = 0.0
        stack.restart_worker("default", **worker_env)
    job = client.get(done_job.name)
    e = item(job, K.ENHANCEMENT_KIND_TRANSLATION, "nl")
    assert job.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED and job.result.text
    assert e.state == S.ENHANCEMENT_STATE_FAILED and e.error_reason == "TIME_LIMIT", e
    assert "MP4T_AI_TIME_LIMIT_S" in e.error_message and e.attempt_count == 1, e
    assert any("translation" in w and "the transcript is unaffected" in w for w in job.warnings), job.warnings
    assert metric_delta(before, after, "mp4t_ai_items_finished_total", state="FAILED", reason="TIME_LIMIT") == 1
    with pytest.raises(grpc.RpcError) as err:
        client.export(job.name, "srt", kind="translation", language="nl")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
