"""Every RPC of the public API has its scope in server/scopes.py, and nothing else is there:
an RPC added to protos/ without a scope is refused for every caller (default-deny), so this test
is what makes the omission visible before a user hits it."""
from __future__ import annotations

import importlib
import pkgutil

import grpc
import pytest

import mp4totext.v1
from server.errors import ApiError
from server.interceptors import AuthInterceptor
from server.scopes import READ, SCOPES, WRITE, scope_for

# every generated module, so a new .proto file's services are checked too
MODULES = tuple(importlib.import_module(f"mp4totext.v1.{m.name}") for m in pkgutil.iter_modules(mp4totext.v1.__path__)
                if m.name.endswith("_pb2"))


def _methods() -> dict[str, object]:
    found = {}
    for module in MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found[f"/{service.full_name}/{method.name}"] = method
    return found


def test_every_rpc_has_exactly_one_scope() -> None:
    methods = _methods()
    assert set(SCOPES) == set(methods), (sorted(set(methods) - set(SCOPES)), sorted(set(SCOPES) - set(methods)))
    assert set(SCOPES.values()) <= {READ, WRITE}


def test_reads_and_writes_are_what_their_names_say() -> None:
    """The convention the table writes out (reads: Get/List/Watch/Export; all else writes)."""
    for name, scope in SCOPES.items():
        verb = name.rpartition("/")[2]
        assert (scope == READ) == verb.startswith(("Get", "List", "Watch", "Export")), name


class _Auth:
    def __init__(self, caller: object) -> None:
        self.caller = caller

    def identify(self, header: str | None) -> object:
        return self.caller


def test_an_unregistered_rpc_is_refused_even_for_the_tenant_key() -> None:
    from core.identity import Identity

    assert scope_for("/mp4totext.v1.SearchService/Search") is None
    interceptor = AuthInterceptor(_Auth(Identity(tenant="t1")))  # type: ignore[arg-type]
    assert interceptor.caller((), "/mp4totext.v1.MediaService/GetMedia").tenant == "t1"
    with pytest.raises(ApiError) as err:
        interceptor.caller((), "/mp4totext.v1.SearchService/Search")
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and "no scope" in str(err.value)


def test_a_read_token_cannot_write() -> None:
    from core.identity import Identity

    token = Identity(tenant="t1", user="u1", scopes=frozenset({"read"}))
    reader = AuthInterceptor(_Auth(token))  # type: ignore[arg-type]
    assert reader.caller((), "/mp4totext.v1.TranscriptionService/ExportTranscription").user == "u1"
    with pytest.raises(ApiError) as err:
        reader.caller((), "/mp4totext.v1.TranscriptionService/EnhanceTranscription")
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and "'write'" in str(err.value)
