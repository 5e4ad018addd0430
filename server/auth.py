"""API keys: ``authorization: Bearer <key>``; keys are stored as sha256 hashes, one tenant each."""
from __future__ import annotations

import contextvars
import hashlib
import secrets
import threading
import time

import peewee as pw

from storage.db import ApiKey, Tenant, connection, database

KEY_PREFIX = "m2t_"
CACHE_TTL_S = 30.0  # a revoked key stops working within this time

# The tenant of the RPC being handled (set by the authentication interceptor).
current_tenant: contextvars.ContextVar[str] = contextvars.ContextVar("current_tenant")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def create_key(tenant_name: str, label: str = "") -> tuple[str, Tenant]:
    """Create (or reuse) the tenant and a new key for it. The key is shown once, stored hashed."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with connection(), database.atomic():
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


class Authenticator:
    def __init__(self) -> None:
        self._cache: dict[str, tuple[str | None, float]] = {}
        self._lock = threading.Lock()

    def tenant_for(self, authorization: str | None) -> str | None:
        """Tenant id for a valid ``Bearer`` header value, else None."""
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        digest = hash_key(key.strip())
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
