"""Fuzzing every RPC of the public API against the real stack, with a fixed budget.

Requests are built from the protos' descriptors by hypothesis (every field: strings with
NUL, control characters, non-Latin text and huge lengths; any int32 for enums; nested
messages), plus raw bytes on the wire and upload streams of random messages. Every answer
must be a deliberate status: never INTERNAL or UNKNOWN, never a traceback, file path or heap
address in the message, never a hang; no upload may leave a row or object behind unless it
succeeded. The test prints its case count and outcome table.
"""
from __future__ import annotations

import collections
import re
from typing import Any, Iterator

import grpc
import pytest
from google.protobuf import descriptor as pd
from google.protobuf import message_factory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mp4totext.v1 import media_pb2, transcription_pb2
from tests.support import Stack


EXAMPLES = 100  # per method: 1,200 cases in all, a fixed budget (derandomized: the same cases every run)
SERVICES = [media_pb2.DESCRIPTOR.services_by_name["MediaService"],
            transcription_pb2.DESCRIPTOR.services_by_name["TranscriptionService"]]
LEAKS = re.compile(r"Traceback|File \"/|0x[0-9a-f]{6,}|/work/|site-packages|psycopg2|peewee|sqlite3")
OUTCOMES: collections.Counter[tuple[str, str]] = collections.Counter()

NASTY = st.sampled_from(["", "\x00", "a\x00b", "\r\n", "é", "媒体", "../../etc/passwd", "%s%n", "media/", "media/x",
                         "transcriptions/", "transcriptions/" + "0" * 32, "media/" + "f" * 32, "x" * 5000])
TEXT = st.one_of(NASTY, st.text(max_size=40), st.text(min_size=1000, max_size=3000))


def messages(desc: pd.Descriptor, depth: int = 0) -> st.SearchStrategy[Any]:
    """Messages of type ``desc`` with some fields set to hostile values."""
    cls = message_factory.GetMessageClass(desc)
    fields = {}
    for f in desc.fields:
        if f.type == f.TYPE_MESSAGE:
            if depth > 2 or f.message_type.full_name.startswith("google.protobuf.") and \
                    f.message_type.name not in ("Duration", "Timestamp"):
                continue
            value = messages(f.message_type, depth + 1)
        elif f.type == f.TYPE_STRING:
            value = TEXT
        elif f.type == f.TYPE_BYTES:
            value = st.binary(max_size=2048)
        elif f.type == f.TYPE_BOOL:
            value = st.booleans()
        elif f.type == f.TYPE_ENUM:
            value = st.integers(-(2**31), 2**31 - 1)
        elif f.type in (f.TYPE_INT64, f.TYPE_SINT64, f.TYPE_SFIXED64):
            value = st.integers(-(2**63), 2**63 - 1)
        elif f.type in (f.TYPE_UINT64, f.TYPE_FIXED64):
            value = st.integers(0, 2**64 - 1)
        elif f.type in (f.TYPE_UINT32, f.TYPE_FIXED32):
            value = st.integers(0, 2**32 - 1)
        elif f.type in (f.TYPE_FLOAT, f.TYPE_DOUBLE):
            value = st.floats(allow_nan=True)
        else:
            value = st.integers(-(2**31), 2**31 - 1)
        fields[f.name] = st.lists(value, max_size=3) if f.is_repeated else value

    @st.composite
    def build(draw: Any) -> Any:
        msg = cls()
        for name in draw(st.lists(st.sampled_from(sorted(fields)), unique=True)) if fields else []:
            value = draw(fields[name])
            f = desc.fields_by_name[name]
            try:
                if f.is_repeated and f.type == f.TYPE_MESSAGE:
                    for item in value:
                        getattr(msg, name).add().CopyFrom(item)
                elif f.is_repeated:
                    getattr(msg, name).extend(value)
                elif f.type == f.TYPE_MESSAGE:
                    getattr(msg, name).CopyFrom(value)
                else:
                    setattr(msg, name, value)
            except (ValueError, TypeError):  # a oneof sibling or a value protobuf refuses itself
                continue
        return msg

    return build()


def _check(method: str, exc: grpc.RpcError | None) -> None:
    code = exc.code() if exc is not None else grpc.StatusCode.OK
    details = (exc.details() or "") if exc is not None else ""
    OUTCOMES[(method, code.name)] += 1
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), (method, code, details[:500])
    assert code != grpc.StatusCode.DEADLINE_EXCEEDED, f"{method} hung"
    assert not LEAKS.search(details), (method, details[:500])
    assert len(details) < 1200, (method, len(details))


def _call(channel: grpc.Channel, key: str, method: pd.MethodDescriptor, request: Any) -> None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    md = (("authorization", f"Bearer {key}"),)
    raw = isinstance(request, bytes)
    ser = (lambda b: b) if raw else (lambda m: m.SerializeToString())
    try:
        if method.client_streaming:
            requests = request if isinstance(request, list) else [request]
            channel.stream_unary(path, request_serializer=ser)(iter(requests), metadata=md, timeout=20)
        elif method.server_streaming:
            for _ in channel.unary_stream(path, request_serializer=ser)(request, metadata=md, timeout=20):
                pass
        else:
            channel.unary_unary(path, request_serializer=ser)(request, metadata=md, timeout=20)
    except grpc.RpcError as exc:
        _check(method.name, exc)
        return
    _check(method.name, None)


METHODS = [m for s in SERVICES for m in s.methods]


@pytest.fixture(scope="module")
def fuzz_channel(stack: Stack) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(stack.target, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)]) as ch:
        yield ch
    print("\nfuzz outcomes (method, code): count")
    for (method, code), n in sorted(OUTCOMES.items()):
        print(f"  {method:28} {code:20} {n}")
    print(f"  {sum(OUTCOMES.values())} cases")


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
def test_fuzz_every_rpc(method: pd.MethodDescriptor, fuzz_channel: grpc.Channel, key_a: str) -> None:
    request_type = method.input_type
    cases = st.one_of(messages(request_type), st.binary(max_size=512))
    if method.client_streaming:
        cases = st.lists(st.one_of(messages(request_type), st.binary(max_size=256)), min_size=0, max_size=4)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(cases)
    def run(request: Any) -> None:
        if isinstance(request, list) and any(isinstance(r, bytes) for r in request):
            request = [r if isinstance(r, bytes) else r.SerializeToString() for r in request]
            _call_raw_stream(fuzz_channel, key_a, method, request)
            return
        _call(fuzz_channel, key_a, method, request)

    run()


def _call_raw_stream(channel: grpc.Channel, key: str, method: pd.MethodDescriptor, requests: list[bytes]) -> None:
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        channel.stream_unary(path)(iter(requests), metadata=(("authorization", f"Bearer {key}"),), timeout=20)
    except grpc.RpcError as exc:
        _check(method.name, exc)
        return
    _check(method.name, None)


def test_fuzzed_uploads_left_nothing_behind(stack: Stack, db: Any, key_a: str, s3_client: Any) -> None:
    """After the fuzzing: every media row of the tenant has its original object, and no
    multipart upload is left open."""
    from server.auth import hash_key
    from storage.db import ApiKey, Media

    with db.connection_context():
        tenant = ApiKey.get(ApiKey.key_hash == hash_key(key_a)).tenant_id
        rows = list(Media.select(Media.object_key).where(Media.tenant == tenant))
    prefix = f"media/{tenant}/"
    keys = {o.object_name for o in s3_client.list_objects(stack.s3["bucket"], prefix=prefix, recursive=True)}
    assert [r.object_key for r in rows if r.object_key not in keys] == []
    open_uploads = s3_client._list_multipart_uploads(stack.s3["bucket"], prefix=prefix).uploads  # noqa: SLF001
    assert list(open_uploads or []) == []
