"""mp4totext.v1.IdentityService: end-user tokens (core.identity), for callers holding the API key."""
from __future__ import annotations

import grpc
import structlog

from core import identity, runtime
from mp4totext.v1 import identity_pb2, identity_pb2_grpc
from server import convert
from server.auth import current_tenant, require_tenant_key
from server.errors import invalid

log = structlog.get_logger(__name__)


def _user_id(value: str) -> str:
    try:
        return identity.check_user_id(value)
    except identity.InvalidRequest as exc:
        raise invalid(str(exc)) from None


def _ttl_s(request: identity_pb2.CreateUserTokenRequest) -> float:
    s = runtime.get().settings
    if not request.HasField("ttl"):
        return s.token_default_ttl_s
    ttl = request.ttl.ToTimedelta().total_seconds()
    if ttl < 1 or ttl > s.token_max_ttl_s:
        raise invalid(f"ttl must be between 1 s and {s.token_max_ttl_s:g} s (unset = {s.token_default_ttl_s:g} s)")
    return ttl


class IdentityService(identity_pb2_grpc.IdentityServiceServicer):
    def CreateUserToken(self, request: identity_pb2.CreateUserTokenRequest, context: grpc.ServicerContext):
        require_tenant_key(context)
        user = _user_id(request.user_id)
        ttl = _ttl_s(request)
        try:
            scopes = identity.check_scopes(list(request.scopes))
        except identity.InvalidRequest as exc:
            raise invalid(str(exc)) from None
        minted = identity.mint(current_tenant.get(), user, ttl, scopes)
        log.info("user_token_minted", user_id=user, key_id=minted.key_id, ttl_s=ttl, scopes=list(minted.scopes))
        return identity_pb2.CreateUserTokenResponse(token=minted.token, expire_time=convert.ts(minted.expire_time),
                                                    key_id=minted.key_id, user_id=user, scopes=minted.scopes)

    def RotateTokenKey(self, request: identity_pb2.RotateTokenKeyRequest, context: grpc.ServicerContext):
        require_tenant_key(context)
        key, retire = identity.rotate(current_tenant.get(), runtime.get().settings.token_max_ttl_s,
                                      retire_previous_now=request.retire_previous_now)
        log.info("token_key_rotated", key_id=key.id, previous_retire_time=retire.isoformat(),
                 retire_previous_now=request.retire_previous_now)
        return identity_pb2.RotateTokenKeyResponse(key_id=key.id, previous_keys_retire_time=convert.ts(retire))

    def RevokeUserTokens(self, request: identity_pb2.RevokeUserTokensRequest, context: grpc.ServicerContext):
        require_tenant_key(context)
        user = _user_id(request.user_id)
        when = identity.revoke(current_tenant.get(), user)
        log.info("user_tokens_revoked", user_id=user)
        return identity_pb2.RevokeUserTokensResponse(revoke_time=convert.ts(when))
