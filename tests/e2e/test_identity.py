"""End-user identity on the real stack (2 servers, workers, RabbitMQ, S3, PostgreSQL).

Tenants mint short-lived JWTs for their users (IdentityService); a user sees only what it created,
the tenant's key sees all of its users', other tenants see nothing. Tokens are checked with an
independent implementation (PyJWT to read, ``hmac`` to verify and to forge), and a sweep calls
every RPC of every service in mp4totext.v1 with other callers' resource names.
"""
from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import hmac
import importlib
import json
import os
import pkgutil
import shutil
import subprocess
import time
import uuid
from typing import Any, Callable

import grpc
import jwt
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import FieldDescriptor

import mp4totext.v1
from mp4totext.client import Client
from mp4totext.v1 import identity_pb2, media_pb2
from mp4totext.v1 import transcription_pb2 as tpb
from tests.support import CLI, ROOT, Stack, wait_for

CACHE_S = 5.0  # MP4T_TOKEN_CACHE_S (default): how long a revocation may take to reach a server
LEEWAY_S = 5  # core.identity.LEEWAY_S: clock skew accepted on exp/iat
NOT_VISIBLE = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(claims: dict[str, Any], secret: str, kid: str | None, alg: str = "HS256") -> str:
    """A JWT built by hand (json + hmac), independent of PyJWT and of the server's code."""
    header: dict[str, Any] = {"alg": alg, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    if alg == "none":
        return signing_input + "."
    return f"{signing_input}.{b64url(hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest())}"


def code_of(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    try:
        result = call()
        if hasattr(result, "__iter__") and not hasattr(result, "DESCRIPTOR"):
            list(result)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@dataclasses.dataclass
class Owned:
    """What one caller created: a media (uniquely named file) and a transcription of it."""

    media: str
    job: str
    filename: str
    media_rid: str
    job_rid: str


@dataclasses.dataclass
class World:
    stack: Stack
    key_a: str
    key_b: str
    tenant_a: str
    tenant_b: str
    users: dict[str, str]  # alice, bob (tenant A), carol (tenant B) -> user id
    tokens: dict[str, str]
    owned: dict[str, Owned]  # alice, bob, carol, admin (tenant A's key)

    def client(self, who: str, server: int = 0) -> Client:
        cred = {"admin_a": self.key_a, "admin_b": self.key_b}.get(who) or self.tokens[who]
        return Client(self.stack.targets[server], cred, retries=2)


def _create(client: Client, src: Any, tmp: Any, who: str) -> Owned:
    path = tmp / f"{who}-secret-{uuid.uuid4().hex[:8]}.mp4"
    shutil.copy(src, path)
    media_rid, job_rid = str(uuid.uuid4()), str(uuid.uuid4())
    media = client.upload(str(path), content_type="video/mp4", request_id=media_rid)
    job = client.create(media.name, request_id=job_rid, language_code="en")
    return Owned(media.name, job.name, path.name, media_rid, job_rid)


@pytest.fixture(scope="module")
def world(stack: Stack, key_a: str, key_b: str, db: Any, speech_mp4: Any,
          tmp_path_factory: pytest.TempPathFactory) -> World:
    from server.auth import Authenticator

    auth = Authenticator()
    run = uuid.uuid4().hex[:6]
    users = {"alice": f"alice-{run}", "bob": f"bob-{run}", "carol": f"carol-{run}"}
    with Client(stack.target, key_a) as admin_a, Client(stack.target, key_b) as admin_b:
        tokens = {"alice": admin_a.create_user_token(users["alice"]).token,
                  "bob": admin_a.create_user_token(users["bob"]).token,
                  "carol": admin_b.create_user_token(users["carol"]).token}
    w = World(stack, key_a, key_b, auth.tenant_for(f"Bearer {key_a}"), auth.tenant_for(f"Bearer {key_b}"),
              users, tokens, {})
    tmp = tmp_path_factory.mktemp("identity")
    for who in ("alice", "bob", "carol", "admin_a"):
        with w.client(who) as c:
            w.owned[who] = _create(c, speech_mp4, tmp, who)
    return w


def _key_secret(kid: str) -> str:
    from storage.tenancy import TokenKey

    return TokenKey.get_by_id(kid).secret


def _claims(w: World, user: str = "alice", **over: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": "mp4totext", "sub": w.users[user], "tid": w.tenant_a, "iat": now, "exp": now + 600,
              "jti": uuid.uuid4().hex}
    claims.update(over)
    return claims


def _list_media(w: World, cred: str, server: int = 0) -> tuple[grpc.StatusCode, str]:
    with Client(w.stack.targets[server], cred, retries=0) as c:
        return code_of(lambda: c.call(c.media.ListMedia, media_pb2.ListMediaRequest()))


def _all_names(c: Client) -> set[str]:
    media = c.call(c.media.ListMedia, media_pb2.ListMediaRequest(page_size=1000)).media
    jobs = c.call(c.transcriptions.ListTranscriptions, tpb.ListTranscriptionsRequest(page_size=1000)).transcriptions
    return {m.name for m in media} | {j.name for j in jobs}


# ---------------------------------------------------------------- tokens


def test_minted_token_verifies_independently(world: World) -> None:
    with world.client("admin_a") as admin:
        resp = admin.create_user_token(world.users["alice"], ttl_s=600)
        default = admin.create_user_token(world.users["alice"])
        for bad in (dict(user_id="", ttl_s=None), dict(user_id="x", ttl_s=86401.0), dict(user_id="x", ttl_s=0.5),
                    dict(user_id=" padded", ttl_s=None), dict(user_id="u" * 129, ttl_s=None)):
            assert code_of(lambda: admin.create_user_token(**bad))[0] == grpc.StatusCode.INVALID_ARGUMENT, bad
    header = jwt.get_unverified_header(resp.token)
    assert header["alg"] == "HS256" and header["kid"] == resp.key_id
    secret = _key_secret(resp.key_id)
    claims = jwt.decode(resp.token, secret, algorithms=["HS256"], issuer="mp4totext")
    assert claims["sub"] == world.users["alice"] and claims["tid"] == world.tenant_a
    assert claims["exp"] - claims["iat"] == 600 and abs(claims["iat"] - time.time()) < 30
    assert len(claims["jti"]) >= 16 and "scope" not in claims
    assert resp.expire_time.ToSeconds() == claims["exp"] and list(resp.scopes) == ["read", "write"]
    d = jwt.decode(default.token, secret, algorithms=["HS256"])
    assert d["exp"] - d["iat"] == 3600 and d["jti"] != claims["jti"]
    # The signature, recomputed with the standard library alone.
    signing_input, _, signature = resp.token.rpartition(".")
    expected = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    assert hmac.compare_digest(b64url(expected), signature)
    assert _list_media(world, resp.token) == (grpc.StatusCode.OK, "")


def test_bad_tokens_are_unauthenticated(world: World) -> None:
    with world.client("admin_a") as admin_a, world.client("admin_b") as admin_b:
        kid_a = admin_a.create_user_token(world.users["alice"]).key_id
        kid_b = admin_b.create_user_token(world.users["carol"]).key_id
        short = admin_a.create_user_token(world.users["alice"], ttl_s=1).token
    secret_a, secret_b = _key_secret(kid_a), _key_secret(kid_b)
    # A hand-made token with the right key works: the forger is right, so the refusals below are meaningful.
    assert _list_media(world, forge(_claims(world), secret_a, kid_a)) == (grpc.StatusCode.OK, "")
    good = world.tokens["alice"]
    head, payload, sig = good.split(".")
    as_bob = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    as_bob["sub"] = world.users["bob"]
    now = int(time.time())
    cases = {
        "expired": forge(_claims(world, iat=now - 7200, exp=now - 60), secret_a, kid_a),
        "tampered signature": f"{head}.{payload}.{sig[:-4]}{'AAAA' if sig[-4:] != 'AAAA' else 'BBBB'}",
        "tampered payload": f"{head}.{b64url(json.dumps(as_bob).encode())}.{sig}",
        "tenant B's key claiming tenant A": forge(_claims(world), secret_b, kid_b),
        "tenant A's kid signed with tenant B's secret": forge(_claims(world), secret_b, kid_a),
        "unknown kid": forge(_claims(world), secret_a, uuid.uuid4().hex),
        "no kid": forge(_claims(world), secret_a, None),
        "alg none": forge(_claims(world), "", kid_a, alg="none"),
        "wrong issuer": forge(_claims(world, iss="someone-else"), secret_a, kid_a),
        "no jti": forge({k: v for k, v in _claims(world).items() if k != "jti"}, secret_a, kid_a),
        "issued in the future": forge(_claims(world, iat=now + 3600, exp=now + 7200), secret_a, kid_a),
        "living longer than the longest ttl": forge(_claims(world, exp=now + 30 * 86400), secret_a, kid_a),
        "garbage": "not.a.jwt",
    }
    for what, token in cases.items():
        for server in (0, 1):
            code, details = _list_media(world, token, server)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (what, code, details)
            assert "token" in details, (what, details)
    assert "expired" in _list_media(world, cases["expired"])[1]
    assert "another tenant" in _list_media(world, cases["tenant B's key claiming tenant A"])[1]
    assert "unknown key" in _list_media(world, cases["unknown kid"])[1]
    assert "longer than" in _list_media(world, cases["living longer than the longest ttl"])[1]
    # A real 1 s token stops working once it expired (plus the clock leeway).
    started = time.monotonic()
    wait_for(lambda: _list_media(world, short)[0] == grpc.StatusCode.UNAUTHENTICATED, 1 + LEEWAY_S + 5,
             "the 1 s token to expire", 0.25)
    assert time.monotonic() - started <= 1 + LEEWAY_S + 5


def test_revocation_reaches_every_server_within_cache_time(world: World) -> None:
    user = f"dave-{uuid.uuid4().hex[:6]}"
    with world.client("admin_a") as admin:
        old = admin.create_user_token(user).token
        for server in (0, 1):  # both servers have the user's (empty) revocation cached now
            assert _list_media(world, old, server)[0] == grpc.StatusCode.OK
        admin.call(admin.identity.RevokeUserTokens, identity_pb2.RevokeUserTokensRequest(user_id=user))
        revoked_at = time.monotonic()
        fresh = admin.create_user_token(user).token  # minted in the same second: must work
    for server in (1, 0):
        wait_for(lambda: _list_media(world, old, server)[0] == grpc.StatusCode.UNAUTHENTICATED, CACHE_S + 5,
                 f"revocation on server {server}", 0.2)
    assert time.monotonic() - revoked_at <= CACHE_S + 2
    assert "revoked" in _list_media(world, old)[1]
    for server in (0, 1):
        assert _list_media(world, fresh, server)[0] == grpc.StatusCode.OK
        assert _list_media(world, world.tokens["alice"], server)[0] == grpc.StatusCode.OK  # others unaffected


def test_rotation_keeps_old_tokens_until_retired(world: World) -> None:
    from server.auth import create_key
    from storage.tenancy import TokenKey

    user = f"erin-{uuid.uuid4().hex[:6]}"
    key, _ = create_key(f"tenant-rotation-{uuid.uuid4().hex[:6]}")  # its own tenant: the others' keys stay
    with Client(world.stack.target, key) as admin:
        before = admin.create_user_token(user)
        rotated = admin.call(admin.identity.RotateTokenKey, identity_pb2.RotateTokenKeyRequest())
        after = admin.create_user_token(user)
    assert rotated.key_id != before.key_id and after.key_id == rotated.key_id
    assert jwt.get_unverified_header(after.token)["kid"] == rotated.key_id
    retire = rotated.previous_keys_retire_time.ToDatetime()
    assert abs((retire - _utcnow()).total_seconds() - 86400) < 120
    for server in (0, 1):
        assert _list_media(world, before.token, server)[0] == grpc.StatusCode.OK
        assert _list_media(world, after.token, server)[0] == grpc.StatusCode.OK
    # Once retired (here: its retirement moved to the past), the old key verifies nothing.
    TokenKey.update(retire_time=_utcnow() - dt.timedelta(seconds=1)).where(
        TokenKey.id == before.key_id).execute()
    for server in (0, 1):
        wait_for(lambda: _list_media(world, before.token, server)[0] == grpc.StatusCode.UNAUTHENTICATED,
                 CACHE_S + 5, "the retired key to stop verifying", 0.2)
    assert _list_media(world, after.token)[0] == grpc.StatusCode.OK


def test_rotation_can_retire_a_leaked_key_at_once(world: World) -> None:
    from server.auth import create_key

    user = f"frank-{uuid.uuid4().hex[:6]}"
    key, _ = create_key(f"tenant-leak-{uuid.uuid4().hex[:6]}")
    with Client(world.stack.target, key) as admin:
        leaked = admin.create_user_token(user)
        for server in (0, 1):  # cached as valid on both servers
            assert _list_media(world, leaked.token, server)[0] == grpc.StatusCode.OK
        rotated = admin.call(admin.identity.RotateTokenKey,
                             identity_pb2.RotateTokenKeyRequest(retire_previous_now=True))
        after = admin.create_user_token(user)
    assert rotated.key_id == after.key_id != leaked.key_id
    assert abs((rotated.previous_keys_retire_time.ToDatetime() - _utcnow()).total_seconds()) < 60
    started = time.monotonic()
    for server in (0, 1):
        wait_for(lambda: _list_media(world, leaked.token, server)[0] == grpc.StatusCode.UNAUTHENTICATED,
                 CACHE_S + 5, "the leaked key to stop verifying", 0.2)
    assert time.monotonic() - started <= CACHE_S + 5
    assert "retired" in _list_media(world, leaked.token)[1]
    assert _list_media(world, after.token)[0] == grpc.StatusCode.OK


def test_tenant_admin_rpcs_need_the_api_key(world: World) -> None:
    with world.client("alice") as alice:
        for method, req in ((alice.identity.CreateUserToken, identity_pb2.CreateUserTokenRequest(user_id="x")),
                            (alice.identity.RotateTokenKey, identity_pb2.RotateTokenKeyRequest()),
                            (alice.identity.RevokeUserTokens, identity_pb2.RevokeUserTokensRequest(user_id="x"))):
            code, details = code_of(lambda: alice.call(method, req))
            assert code == grpc.StatusCode.PERMISSION_DENIED and "API key" in details


def test_read_scope_cannot_write(world: World, speech_mp4: Any) -> None:
    with world.client("admin_a") as admin:
        token = admin.create_user_token(world.users["alice"], scopes=("read",))
        assert list(token.scopes) == ["read"]
        assert code_of(lambda: admin.create_user_token("x", scopes=("admin",)))[0] == grpc.StatusCode.INVALID_ARGUMENT
    with Client(world.stack.target, token.token, retries=0) as ro:
        assert ro.get_media(world.owned["alice"].media).name == world.owned["alice"].media
        code, details = code_of(lambda: ro.upload(str(speech_mp4)))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "write" in details
        code, _ = code_of(lambda: ro.create(world.owned["alice"].media))
        assert code == grpc.StatusCode.PERMISSION_DENIED


# ---------------------------------------------------------------- ownership


def test_rows_record_their_owner(world: World) -> None:
    from storage.db import Media, Transcription

    for who, owner in (("alice", world.users["alice"]), ("bob", world.users["bob"]), ("admin_a", "")):
        o = world.owned[who]
        assert Media.get_by_id(o.media.split("/")[1]).owner == owner
        assert Transcription.get_by_id(o.job.split("/")[1]).owner == owner
    # The tenant's key transcribing a user's media does it for that user: the job is the user's.
    with world.client("admin_a") as admin, world.client("alice") as alice, world.client("bob") as bob:
        job = admin.create(world.owned["alice"].media, language_code="en")
        assert Transcription.get_by_id(job.name.split("/")[1]).owner == world.users["alice"]
        assert alice.get(job.name).name == job.name
        assert code_of(lambda: bob.get(job.name))[0] == grpc.StatusCode.NOT_FOUND
        admin.call(admin.transcriptions.DeleteTranscription, tpb.DeleteTranscriptionRequest(name=job.name))


def _foreign_calls(c: Client, o: Owned) -> dict[str, Callable[[], Any]]:
    t = c.transcriptions
    return {
        "GetMedia": lambda: c.get_media(o.media),
        "GetTranscription": lambda: c.get(o.job),
        "WatchTranscription": lambda: t.WatchTranscription(tpb.WatchTranscriptionRequest(name=o.job),
                                                           metadata=c.metadata, timeout=20),
        "ExportTranscription": lambda: t.ExportTranscription(tpb.ExportTranscriptionRequest(
            name=o.job, format=tpb.EXPORT_FORMAT_TXT), metadata=c.metadata, timeout=20),
        "CreateTranscription": lambda: c.create(o.media),
        "ListTranscriptions(media)": lambda: c.call(t.ListTranscriptions, tpb.ListTranscriptionsRequest(media=o.media)),
        "CancelTranscription": lambda: c.call(t.CancelTranscription, tpb.CancelTranscriptionRequest(name=o.job)),
        "DeleteTranscription": lambda: c.call(t.DeleteTranscription, tpb.DeleteTranscriptionRequest(name=o.job)),
        "DeleteMedia": lambda: c.call(c.media.DeleteMedia, media_pb2.DeleteMediaRequest(name=o.media, force=True)),
    }


def test_each_user_sees_only_their_own(world: World) -> None:
    w, o = world, world.owned
    for me, others in (("alice", ("bob", "admin_a", "carol")), ("bob", ("alice", "admin_a", "carol")),
                       ("carol", ("alice", "bob", "admin_a")), ("admin_b", ("alice", "bob", "admin_a"))):
        with w.client(me) as c:
            names = _all_names(c)
            for other in others:
                assert not names & {o[other].media, o[other].job}, (me, other)
                for rpc, call in _foreign_calls(c, o[other]).items():
                    code, details = code_of(call)
                    if rpc == "ListTranscriptions(media)" and code == grpc.StatusCode.OK:
                        assert not call().transcriptions, (me, other, rpc)
                        continue
                    assert code == grpc.StatusCode.NOT_FOUND, (me, other, rpc, code, details)
                    assert o[other].filename not in details
            if me in o:
                assert {o[me].media, o[me].job} <= names
                assert c.get(o[me].job).name == o[me].job and c.get_media(o[me].media).name == o[me].media
    with w.client("admin_a") as admin:  # the tenant's key sees all of its users' resources
        names = _all_names(admin)
        for who in ("alice", "bob", "admin_a"):
            assert {o[who].media, o[who].job} <= names
            assert admin.get(o[who].job).name == o[who].job
        assert not names & {o["carol"].media, o["carol"].job}
        for who in ("alice", "bob"):  # nothing was cancelled or deleted by the others' attempts
            job = admin.get(o[who].job)
            assert not job.cancel_requested, who
            assert admin.get_media(o[who].media).name == o[who].media


def test_users_watch_and_export_their_own(world: World) -> None:
    with world.client("alice") as alice:
        job = wait_for(lambda: (j := alice.get(world.owned["alice"].job)).state in (
            tpb.TRANSCRIPTION_STATE_SUCCEEDED, tpb.TRANSCRIPTION_STATE_FAILED) and j, 300, "alice's job", 0.5)
        assert job.state == tpb.TRANSCRIPTION_STATE_SUCCEEDED, job.error_message
        events = list(alice.transcriptions.WatchTranscription(tpb.WatchTranscriptionRequest(name=job.name),
                                                              metadata=alice.metadata, timeout=30))
        assert events[-1].state == tpb.TRANSCRIPTION_STATE_SUCCEEDED
        text = b"".join(r.data for r in alice.transcriptions.ExportTranscription(
            tpb.ExportTranscriptionRequest(name=job.name, format=tpb.EXPORT_FORMAT_TXT), metadata=alice.metadata))
        assert text.strip()
    with world.client("bob") as bob:  # and the finished job is still NOT_FOUND for bob
        code, _ = code_of(lambda: list(bob.transcriptions.ExportTranscription(
            tpb.ExportTranscriptionRequest(name=job.name, format=tpb.EXPORT_FORMAT_TXT), metadata=bob.metadata)))
        assert code == grpc.StatusCode.NOT_FOUND


def test_request_ids_belong_to_their_caller(world: World, speech_mp4: Any) -> None:
    a = world.owned["alice"]
    with world.client("bob") as bob, world.client("alice") as alice:
        code, details = code_of(lambda: bob.upload(str(speech_mp4), request_id=a.media_rid))
        assert code == grpc.StatusCode.ALREADY_EXISTS and a.filename not in details and a.media not in details
        code, details = code_of(lambda: bob.create(world.owned["bob"].media, request_id=a.job_rid))
        assert code == grpc.StatusCode.ALREADY_EXISTS and a.job not in details
        assert alice.create(a.media, request_id=a.job_rid).name == a.job  # alice's own retry is idempotent


def test_cli_token_command(world: World) -> None:
    env = {**os.environ, "MP4T_LOG_LEVEL": "WARNING"}
    out = subprocess.run([*CLI, "token", "--user", world.users["alice"], "--ttl", "120", "--server",
                          world.stack.target, "--api-key", world.key_a], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    claims = jwt.decode(printed["token"], _key_secret(printed["key_id"]), algorithms=["HS256"])
    assert claims["sub"] == world.users["alice"] and claims["exp"] - claims["iat"] == 120
    denied = subprocess.run([*CLI, "token", "--user", "x", "--server", world.stack.target, "--api-key",
                             world.tokens["alice"]], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert denied.returncode == 2 and "PERMISSION_DENIED" in denied.stderr


# ---------------------------------------------------------------- the sweep: every RPC of every service


# Request fields that name a resource (top level or in a nested message, as in WebhookEndpoint.name).
NAME_FIELDS = ("name", "media", "parent", "transcription", "resource", "upload_session", "event", "endpoint")


def _services() -> list[Any]:
    found = []
    for info in pkgutil.iter_modules(mp4totext.v1.__path__):
        if info.name.endswith("_pb2"):
            module = importlib.import_module(f"mp4totext.v1.{info.name}")
            found.extend(module.DESCRIPTOR.services_by_name.values())
    return sorted(found, key=lambda s: s.full_name)


def _name_paths(desc: Any, depth: int = 0) -> list[list[Any]]:
    """Paths to the string fields of a request that name a resource (nested messages too)."""
    paths = []
    for f in desc.fields:
        if f.type == FieldDescriptor.TYPE_STRING and not f.is_repeated and (
                f.name in NAME_FIELDS or f.name.endswith("_name")):
            paths.append([f])
        elif f.type == FieldDescriptor.TYPE_MESSAGE and depth < 2 and not f.message_type.full_name.startswith(
                "google."):
            paths.extend([f, *p] for p in _name_paths(f.message_type, depth + 1))
    return paths


def _request(method: Any, value: str) -> Any:
    msg = message_factory.GetMessageClass(method.input_type)()
    for path in _name_paths(method.input_type):
        target = msg
        for f in path[:-1]:
            target = getattr(target, f.name)
        setattr(target, path[-1].name, value)
    return msg


def _invoke(channel: grpc.Channel, method: Any, request: Any, cred: str) -> tuple[grpc.StatusCode, str, bytes]:
    path = f"/{method.containing_service.full_name}/{method.name}"
    out_cls = message_factory.GetMessageClass(method.output_type)
    kind = ("stream" if method.client_streaming else "unary") + "_" + ("stream" if method.server_streaming else "unary")
    rpc = getattr(channel, kind)(path, request_serializer=lambda m: m.SerializeToString(),
                                 response_deserializer=out_cls.FromString)
    md = (("authorization", f"Bearer {cred}"),)
    arg = iter([request]) if method.client_streaming else request
    try:
        result = rpc(arg, metadata=md, timeout=20)
        data = b"".join(m.SerializeToString() for m in result) if method.server_streaming else \
            result.SerializeToString()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", b""
    return grpc.StatusCode.OK, "", data


@dataclasses.dataclass
class Victim:
    name: str  # collection/id
    secrets: list[str]  # what an attacker must never see (the id too, in an answer)

    @property
    def id(self) -> str:
        return self.name.rpartition("/")[2]


def _victims(w: World) -> list[Victim]:
    """Resources of every kind the API has, owned by alice (user of tenant A) or by tenant A's key:
    media and transcriptions, an upload session, a webhook endpoint."""
    from mp4totext.v1 import media_pb2_grpc, webhooks_pb2, webhooks_pb2_grpc

    out = [Victim(v.media, [v.filename]) for v in (w.owned["alice"], w.owned["admin_a"])]
    out += [Victim(v.job, [v.filename]) for v in (w.owned["alice"], w.owned["admin_a"])]
    marker = f"alice-session-{uuid.uuid4().hex[:8]}.mp4"
    with grpc.insecure_channel(w.stack.target) as ch:
        session = media_pb2_grpc.MediaServiceStub(ch).CreateUploadSession(
            media_pb2.CreateUploadSessionRequest(metadata=media_pb2.UploadMetadata(
                filename=marker, size_bytes=4096, sha256=hashlib.sha256(b"x" * 4096).hexdigest())),
            metadata=(("authorization", f"Bearer {w.tokens['alice']}"),), timeout=20)
        out.append(Victim(session.name, [marker]))
        note = f"tenant-a-hook-{uuid.uuid4().hex[:8]}"
        hook = webhooks_pb2_grpc.WebhookServiceStub(ch).CreateWebhookEndpoint(
            webhooks_pb2.CreateWebhookEndpointRequest(webhook_endpoint=webhooks_pb2.WebhookEndpoint(
                url="https://93.184.215.14/hook", description=note)),
            metadata=(("authorization", f"Bearer {w.key_a}"),), timeout=20)
        out.append(Victim(hook.webhook_endpoint.name, [note, hook.secret]))
    return out


def test_sweep_every_rpc_with_foreign_resources(world: World, capsys: pytest.CaptureFixture) -> None:
    """Every RPC, called by another user of the tenant, by another tenant and by its user, with the
    victims' resource names (of every kind), answers exactly as for a resource that does not exist
    (same code, same message but for the id) and never returns or echoes the victims' data."""
    w = world
    victims = _victims(w)
    attackers = {"bob": w.tokens["bob"], "carol": w.tokens["carol"], "admin_b": w.key_b}
    services = _services()
    assert {"MediaService", "TranscriptionService", "IdentityService"} <= {s.name for s in services}
    no_name, checked = [], 0

    def no_leak(rpc: str, who: str, details: str, data: bytes) -> None:
        for v in victims:
            for secret in v.secrets:
                assert secret not in details and secret.encode() not in data, (rpc, who, v.name)
            assert v.id.encode() not in data, (rpc, who, v.name, "id in the answer")

    with grpc.insecure_channel(w.stack.target) as ch:
        for service in services:
            for method in service.methods:
                rpc = f"{service.name}.{method.name}"
                named = bool(_name_paths(method.input_type))
                if not named:
                    no_name.append(rpc)
                for who, cred in attackers.items():
                    if not named:  # nothing to point at: it must not show the victims' data
                        code, details, data = _invoke(ch, method, _request(method, ""), cred)
                        assert code != grpc.StatusCode.UNIMPLEMENTED, f"{rpc} is not served"
                        no_leak(rpc, who, details, data)
                        checked += 1
                        continue
                    for v in victims:
                        ghost = f"{v.name.rpartition('/')[0]}/{uuid.uuid4().hex}"
                        code, details, data = _invoke(ch, method, _request(method, v.name), cred)
                        g_code, g_details, _ = _invoke(ch, method, _request(method, ghost), cred)
                        assert code != grpc.StatusCode.UNIMPLEMENTED, f"{rpc} is not served"
                        assert code == g_code, (rpc, who, v.name, code, details, g_code, g_details)
                        assert details.replace(v.id, "ID") == g_details.replace(ghost.rpartition("/")[2], "ID"), \
                            (rpc, who, details, g_details)
                        no_leak(rpc, who, details, data)
                        assert code in (*NOT_VISIBLE, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OK,
                                        grpc.StatusCode.FAILED_PRECONDITION), (rpc, who, code, details)
                        checked += 1
    with capsys.disabled():
        print(f"\nsweep: {checked} checks over {sum(len(s.methods) for s in services)} RPCs of {len(services)} "
              f"services, {len(victims)} victims of kinds {sorted({v.name.split('/')[0] for v in victims})}; "
              f"RPCs without a resource name (checked for leaks only): {', '.join(sorted(no_name))}")
    with w.client("admin_a") as admin:  # the victims' resources are intact
        for v in (w.owned["alice"], w.owned["admin_a"]):
            assert admin.get_media(v.media).name == v.media
            job = admin.get(v.job)
            assert job.name == v.job and not job.cancel_requested
