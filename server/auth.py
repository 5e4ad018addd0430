"""Callers: ``authorization: Bearer <API key or end-user token>``.

API keys are stored as sha256 hashes, one tenant each; end-user tokens are JWTs minted by
IdentityService (core.identity). ``current_tenant``/``current_user`` hold the caller of the RPC
being handled (set by the authentication interceptor)."""
from __future__ import annotations

import contextvars
import hashlib
import secrets
import threading
import time
from typing import Any

import grpc
import peewee as pw

from core import identity
from mp4totext import config
from server.errors import ApiError
from storage.db import ApiKey, Tenant, connection, locked

KEY_PREFIX = "m2t_"
CACHE_TTL_S = 30.0  # a revoked key stops working within this time

# The tenant of the RPC being handled (set by the authentication interceptor).
current_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("current_tenant")
# The end user of the RPC: "" for the tenant's API key (sees everything of its tenant), else the
# user id of an end-user token (sees only what that user created: the rows' ``owner``).
current_user: contextvars.ContextVar[str] = contextvars.ContextVar("current_user", default="")


def require_tenant_key(context: Any = None) -> None:
    """For tenant-admin RPCs (webhooks, the whole tenant's usage, minting tokens): a call made with
    an end-user token is PERMISSION_DENIED (raised as an ApiError the interceptor maps)."""
    if current_user.get(""):
        raise ApiError(grpc.StatusCode.PERMISSION_DENIED,
                       "this call needs the tenant's API key; end-user tokens cannot make it "
                       "(call it from your backend with the API key)")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(tenant_name: str, label: str = "") -> tuple[str, Tenant]:
    """Create (or reuse) the tenant and a new key for it. The key is shown once, stored hashed."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with locked():  # a write transaction from the start: SQLite's deferred one fails under a concurrent writer
        try:
            tenant, _ = Tenant.get_or_create(name=tenant_name)
        except pw.IntegrityError:
            tenant = Tenant.get(Tenant.name == tenant_name)
        ApiKey.create(tenant=tenant, key_hash=hash_key(key), prefix=key[:12], label=label)
    return key, tenant


def revoke_key(key_prefix: str) -> int:
    with connection():
        return ApiKey.update(revoked=True).where(ApiKey.prefix == key_prefix).execute()


def tenant_gone() -> bool:
    """Whether the caller's tenant was deleted after its key was cached (a write then fails on
    the tenant's foreign key, a read finds nothing): the call is UNAUTHENTICATED, not INTERNAL."""
    tenant = current_tenant.get(None)
    if tenant is None:
        return False
    try:
        with connection():
            return not Tenant.select().where(Tenant.id == tenant).exists()
    except Exception:  # noqa: BLE001 - the caller reports its own error
        return False


def _bearer(authorization: str | None) -> str | None:
    if not authorization:
        return None
    scheme, _, credential = authorization.partition(" ")
    if scheme.lower() != "bearer" or not credential.strip():
        return None
    return credential.strip()


class Authenticator:
    """Resolves ``authorization: Bearer <credential>``: an API key (``m2t_...``: the tenant, no
    user) or an end-user token (a JWT: core.identity verifies it; its tenant and user)."""

    def __init__(self, token_cache_s: float | None = None) -> None:
        self._cache: dict[str, tuple[str | None, float]] = {}
        self._lock = threading.Lock()
        cache_s = config.settings().token_cache_s if token_cache_s is None else token_cache_s
        self.tokens = identity.Verifier(cache_s)

    def identify(self, authorization: str | None) -> identity.Identity | None:
        """The caller, or None for a missing/unknown API key; a bad end-user token raises
        ``identity.TokenError`` (its message says why)."""
        credential = _bearer(authorization)
        if credential is None:
            return None
        if not credential.startswith(KEY_PREFIX) and identity.looks_like_jwt(credential):
            return self.tokens.verify(credential)
        tenant = self._key_tenant(credential)
        return identity.Identity(tenant) if tenant else None

    def tenant_for(self, authorization: str | None) -> str | None:
        """Tenant id for a valid ``Bearer`` header value (API key or user token), else None."""
        try:
            caller = self.identify(authorization)
        except identity.TokenError:
            return None
        return caller.tenant if caller else None

    def owner_for(self, authorization: str | None) -> tuple[str, str] | None:
        """(tenant, user) for a valid ``Bearer`` header value (user "" for an API key), else None."""
        try:
            caller = self.identify(authorization)
        except identity.TokenError:
            return None
        return (caller.tenant, caller.user) if caller else None

    def _key_tenant(self, key: str) -> str | None:
        digest = hash_key(key)
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(digest)
            if hit and hit[1] > now:
                return hit[0]
        with connection():
            row = (
                ApiKey.select(ApiKey.tenant)
                .where(ApiKey.key_hash == digest, ApiKey.revoked == False)  # noqa: E712
                .first()
            )
        tenant_id = row.tenant_id if row else None
        with self._lock:
            if len(self._cache) > 10000:
                self._cache.clear()
            self._cache[digest] = (tenant_id, now + CACHE_TTL_S)
        return tenant_id
