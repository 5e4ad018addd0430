"""End-user tokens: short-lived HS256 JWTs a tenant's backend mints for its app's users.

A token names the user (``sub``) and the tenant (``tid``) and is signed with one of the
tenant's signing keys (``TokenKey``; header ``kid``). The secrets are random 256-bit values the
server generates and keeps in the database as they are (nobody outside the server ever needs
them: tokens are minted by the server, through IdentityService, for a caller holding the API key).

- Minting uses the tenant's current key (the newest one not retired), created on first use.
- ``rotate`` makes a new current key; the previous ones keep verifying until every token they may
  have signed has expired (``max_ttl_s`` + clock leeway), or stop at once (``retire_previous_now``:
  a key that may have leaked), and are deleted by a later rotation. Whatever the key, a token whose
  lifetime (``exp - iat``) is longer than ``max_ttl_s`` + leeway is refused: a key's holder cannot
  mint tokens that outlive its retirement by much.
- ``revoke`` sets a per-user not-before: tokens issued earlier are refused. A token minted after a
  revocation has ``iat`` at or after it (``iat`` is raised to the next whole second if needed).
- ``Verifier`` checks a token against the keys, caching keys and revocations for ``cache_s``
  seconds: that is how long a revocation may take to reach every server.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import math
import re
import secrets
import threading
import time
import uuid
from typing import Any

import jwt
import peewee as pw

from mp4totext import config
from storage.db import connection, database, locked, utcnow
from storage.tenancy import TokenKey, UserTokenRevocation

ISSUER = "mp4totext"
ALGORITHM = "HS256"
SCOPES = ("read", "write")
LEEWAY_S = 5  # clock skew between the servers that mint and the ones that verify
MAX_USER_ID = 128
_USER_ID = re.compile(r"^[\x21-\x7e](?:[\x20-\x7e]{0,126}[\x21-\x7e])?$")
_KID = re.compile(r"^[0-9a-f]{32}$")


class TokenError(Exception):
    """A token that does not authenticate; the message tells the caller why and what to do."""


class InvalidRequest(ValueError):
    """A mint/revoke request that is not valid (the message is for the caller)."""


@dataclasses.dataclass(frozen=True)
class Identity:
    tenant: str
    user: str = ""  # "" = the tenant's API key
    scopes: frozenset[str] = frozenset(SCOPES)


@dataclasses.dataclass(frozen=True)
class Minted:
    token: str
    expire_time: dt.datetime  # naive UTC
    key_id: str
    user_id: str
    scopes: tuple[str, ...]


def check_user_id(user_id: str) -> str:
    if not _USER_ID.match(user_id or ""):
        raise InvalidRequest(f"user_id must be 1..{MAX_USER_ID} printable ASCII characters without leading or "
                             "trailing spaces (your own id for the end user)")
    return user_id


def check_scopes(scopes: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    wanted = tuple(sorted({s.strip().lower() for s in scopes}))
    unknown = [s for s in wanted if s not in SCOPES]
    if unknown:
        raise InvalidRequest(f"unknown scope(s) {', '.join(map(repr, unknown))}; use 'read' and/or 'write' "
                             "(none = both)")
    return wanted or SCOPES


def looks_like_jwt(credential: str) -> bool:
    return credential.count(".") == 2


def _epoch(t: dt.datetime) -> float:
    return t.replace(tzinfo=dt.timezone.utc).timestamp()


def current_key(tenant: str) -> TokenKey:
    """The tenant's signing key, created on first use."""
    with connection():
        key = (TokenKey.select().where(TokenKey.tenant == tenant, TokenKey.retire_time.is_null())
               .order_by(TokenKey.create_time.desc(), TokenKey.id.desc()).first())
        if key is None:
            key = TokenKey.create(tenant=tenant, secret=secrets.token_urlsafe(32))
    return key


def _not_before(tenant: str, user_id: str) -> float | None:
    with connection():
        row = UserTokenRevocation.get_or_none(UserTokenRevocation.tenant == tenant,
                                              UserTokenRevocation.user_id == user_id)
    return _epoch(row.not_before) if row else None


def mint(tenant: str, user_id: str, ttl_s: float, scopes: tuple[str, ...] = SCOPES) -> Minted:
    """A token for ``user_id`` of ``tenant`` valid for ``ttl_s`` seconds (checked by the caller)."""
    key = current_key(tenant)
    iat = int(time.time())
    revoked = _not_before(tenant, user_id)
    if revoked is not None and iat < revoked:  # minted in the second of a revocation: stay valid
        iat = math.ceil(revoked)
    exp = iat + max(1, int(ttl_s))
    claims: dict[str, Any] = {"iss": ISSUER, "sub": user_id, "tid": tenant, "iat": iat, "exp": exp,
                              "jti": uuid.uuid4().hex}
    if set(scopes) != set(SCOPES):
        claims["scope"] = " ".join(scopes)
    token = jwt.encode(claims, key.secret, algorithm=ALGORITHM, headers={"kid": key.id})
    expire = dt.datetime.fromtimestamp(exp, dt.timezone.utc).replace(tzinfo=None)
    return Minted(token, expire, key.id, user_id, tuple(scopes))


def rotate(tenant: str, max_ttl_s: float, retire_previous_now: bool = False) -> tuple[TokenKey, dt.datetime]:
    """A new current key; the previous ones retire when their tokens have expired, or now (all of
    them, those already retiring included) with ``retire_previous_now``. Keys retired earlier than
    now are deleted. Returns the new key and when the previous ones retire."""
    now = utcnow()
    retire = now if retire_previous_now else now + dt.timedelta(seconds=max_ttl_s + LEEWAY_S)
    previous = TokenKey.retire_time.is_null()
    if retire_previous_now:
        previous |= TokenKey.retire_time > now
    with locked():
        TokenKey.delete().where(TokenKey.tenant == tenant, TokenKey.retire_time < now).execute()
        TokenKey.update(retire_time=retire).where(TokenKey.tenant == tenant, previous).execute()
        key = TokenKey.create(tenant=tenant, secret=secrets.token_urlsafe(32), create_time=now)
    return key, retire


def revoke(tenant: str, user_id: str) -> dt.datetime:
    """Tokens of ``user_id`` issued until now stop working (within the verifiers' cache time)."""
    now = utcnow()
    where = (UserTokenRevocation.tenant == tenant) & (UserTokenRevocation.user_id == user_id)
    with locked():
        if UserTokenRevocation.update(not_before=now).where(where).execute():
            return now
        try:
            with database.atomic():  # a savepoint: a concurrent insert must not end the transaction
                UserTokenRevocation.create(tenant=tenant, user_id=user_id, not_before=now)
        except pw.IntegrityError:  # revoked concurrently: this later time wins
            UserTokenRevocation.update(not_before=now).where(where).execute()
    return now


@dataclasses.dataclass(frozen=True)
class _Key:
    tenant: str
    secret: str
    retire: float | None  # epoch seconds, None = current


class Verifier:
    """Verifies tokens; keys and revocations are cached for ``cache_s`` seconds. A token may live
    at most ``max_ttl_s`` (default: MP4T_TOKEN_MAX_TTL_S) + the clock leeway."""

    def __init__(self, cache_s: float, max_ttl_s: float | None = None) -> None:
        self.cache_s = cache_s
        self.max_ttl_s = config.settings().token_max_ttl_s if max_ttl_s is None else max_ttl_s
        self._keys: dict[str, tuple[_Key | None, float]] = {}
        self._revoked: dict[tuple[str, str], tuple[float | None, float]] = {}
        self._lock = threading.Lock()

    def _cached(self, cache: dict, key: Any, load: Any) -> Any:
        now = time.monotonic()
        with self._lock:
            hit = cache.get(key)
            if hit and hit[1] > now:
                return hit[0]
        value = load()
        with self._lock:
            if len(cache) > 10000:
                cache.clear()
            cache[key] = (value, now + self.cache_s)
        return value

    def _load_key(self, kid: str) -> _Key | None:
        with connection():
            row = TokenKey.get_or_none(TokenKey.id == kid)
        if row is None:
            return None
        return _Key(row.tenant_id, row.secret, _epoch(row.retire_time) if row.retire_time else None)

    def verify(self, token: str) -> Identity:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError("the bearer token is neither an API key (m2t_...) nor a well-formed JWT") from None
        kid, alg = header.get("kid"), header.get("alg")
        if alg != ALGORITHM:
            raise TokenError(f"token algorithm {str(alg)[:20]!r} is not accepted (HS256 only); mint tokens with "
                             "IdentityService.CreateUserToken")
        if not isinstance(kid, str) or not _KID.match(kid):
            raise TokenError("the token has no valid 'kid' header; mint tokens with IdentityService.CreateUserToken")
        key = self._cached(self._keys, kid, lambda: self._load_key(kid))
        if key is None:
            raise TokenError("the token is signed by an unknown key (deleted, retired or never issued); "
                             "get a new token from your backend")
        if key.retire is not None and time.time() >= key.retire:
            raise TokenError("the token's signing key is retired; get a new token from your backend")
        claims = self._decode(token, key.secret)
        if int(claims["exp"]) - int(claims["iat"]) > self.max_ttl_s + LEEWAY_S:  # int(): PyJWT checked both
            raise TokenError(f"the token claims to live longer than {self.max_ttl_s:g} s, the longest lifetime "
                             "a token may have; mint tokens with IdentityService.CreateUserToken")
        if claims["tid"] != key.tenant:
            raise TokenError("the token claims another tenant than the one whose key signed it")
        user = claims["sub"]
        if not isinstance(user, str) or not _USER_ID.match(user):
            raise TokenError("the token's subject is not a valid user id")
        not_before = self._cached(self._revoked, (key.tenant, user), lambda: _not_before(key.tenant, user))
        if not_before is not None and claims["iat"] < not_before:
            raise TokenError("the token was revoked (RevokeUserTokens); get a new token from your backend")
        scope = claims.get("scope")
        scopes = frozenset(scope.split()) if isinstance(scope, str) else frozenset(SCOPES)
        return Identity(key.tenant, user, scopes & frozenset(SCOPES))

    @staticmethod
    def _decode(token: str, secret: str) -> dict[str, Any]:
        try:
            return jwt.decode(token, secret, algorithms=[ALGORITHM], issuer=ISSUER, leeway=LEEWAY_S,
                              options={"require": ["iss", "sub", "tid", "iat", "exp", "jti"]})
        except jwt.ExpiredSignatureError:
            raise TokenError("the token has expired; get a new one from your backend") from None
        except jwt.InvalidSignatureError:
            raise TokenError("the token's signature does not verify (tampered, or not minted by this service)") \
                from None
        except jwt.ImmatureSignatureError:
            raise TokenError("the token is issued in the future (clock skew?); get a new one") from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"the token is not valid: {str(exc)[:200]}") from None
