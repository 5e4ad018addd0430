"""core.identity on SQLite: mint, verify, rotate, revoke, and the edge of a revocation's second
(the wire-level behaviour is in tests/e2e/test_identity.py)."""
from __future__ import annotations

import datetime as dt
import pathlib
from typing import Iterator

import jwt
import pytest

from core import identity
from storage import db as dbmod
from storage import schema, tenancy


@pytest.fixture()
def tenant(tmp_path: pathlib.Path) -> Iterator[str]:
    schema.init_db(f"sqlite:///{tmp_path / 'x.db'}")
    try:
        with dbmod.connection():
            yield dbmod.Tenant.create(name="acme").id
    finally:
        dbmod.database.close()


def test_mint_verify_and_claims(tenant: str) -> None:
    minted = identity.mint(tenant, "user-1", 60, ("read",))
    who = identity.Verifier(0).verify(minted.token)
    assert (who.tenant, who.user, who.scopes) == (tenant, "user-1", frozenset({"read"}))
    claims = jwt.decode(minted.token, options={"verify_signature": False})
    assert claims["scope"] == "read" and claims["exp"] - claims["iat"] == 60 and claims["iss"] == "mp4totext"
    assert identity.Verifier(0).verify(identity.mint(tenant, "user-1", 60).token).scopes == {"read", "write"}


def test_rotation_and_retirement(tenant: str) -> None:
    old = identity.mint(tenant, "u", 60)
    key, retire = identity.rotate(tenant, 3600)
    new = identity.mint(tenant, "u", 60)
    assert new.key_id == key.id != old.key_id
    assert (retire - dbmod.utcnow()).total_seconds() == pytest.approx(3600 + identity.LEEWAY_S, abs=5)
    verifier = identity.Verifier(0)
    assert verifier.verify(old.token).user == verifier.verify(new.token).user == "u"
    tenancy.TokenKey.update(retire_time=dbmod.utcnow() - dt.timedelta(seconds=1)).where(
        tenancy.TokenKey.id == old.key_id).execute()
    with pytest.raises(identity.TokenError, match="retired"):
        verifier.verify(old.token)
    identity.rotate(tenant, 3600)  # deletes keys retired before now
    assert tenancy.TokenKey.get_or_none(tenancy.TokenKey.id == old.key_id) is None
    with pytest.raises(identity.TokenError, match="unknown key"):
        verifier.verify(old.token)
    assert verifier.verify(new.token).user == "u"  # the previous current key still verifies


def test_revocation_spares_tokens_minted_after_it(tenant: str) -> None:
    before = identity.mint(tenant, "u", 60)
    identity.revoke(tenant, "u")
    after = identity.mint(tenant, "u", 60)  # usually within the same second as the revocation
    verifier = identity.Verifier(0)
    with pytest.raises(identity.TokenError, match="revoked"):
        verifier.verify(before.token)
    assert verifier.verify(after.token).user == "u"
    identity.revoke(tenant, "u")  # a second revocation updates the row
    assert tenancy.UserTokenRevocation.select().count() == 1
    assert identity.Verifier(0).verify(identity.mint(tenant, "other", 60).token).user == "other"


def test_cache_delays_revocation_by_at_most_its_time(tenant: str) -> None:
    token = identity.mint(tenant, "u", 60).token
    cached = identity.Verifier(3600)
    cached.verify(token)
    identity.revoke(tenant, "u")
    assert cached.verify(token).user == "u"  # cached: the documented delay
    with pytest.raises(identity.TokenError, match="revoked"):
        identity.Verifier(0).verify(token)


@pytest.mark.parametrize("user_id", ["", " x", "x ", "é", "a" * 129, "line\nbreak"])
def test_bad_user_ids(user_id: str) -> None:
    with pytest.raises(identity.InvalidRequest):
        identity.check_user_id(user_id)


def test_scopes() -> None:
    assert identity.check_scopes([]) == ("read", "write")
    assert identity.check_scopes(["WRITE", "read", "read"]) == ("read", "write")
    with pytest.raises(identity.InvalidRequest, match="admin"):
        identity.check_scopes(["admin"])


def test_rotation_can_retire_the_previous_keys_now(tenant: str) -> None:
    old = identity.mint(tenant, "u", 60)
    verifier = identity.Verifier(0)
    assert verifier.verify(old.token).user == "u"
    key, retire = identity.rotate(tenant, 3600, retire_previous_now=True)
    assert abs((retire - dbmod.utcnow()).total_seconds()) < 5
    with pytest.raises(identity.TokenError, match="retired"):
        verifier.verify(old.token)
    new = identity.mint(tenant, "u", 60)
    assert new.key_id == key.id and verifier.verify(new.token).user == "u"
    identity.rotate(tenant, 3600, retire_previous_now=True)  # also ends a key that was retiring later
    with pytest.raises(identity.TokenError, match="retired"):
        verifier.verify(new.token)


def test_a_token_living_longer_than_the_longest_ttl_is_refused(tenant: str) -> None:
    """A holder of a leaked signing key cannot mint itself a token that outlives key rotation."""
    key = identity.current_key(tenant)
    now = int(dt.datetime.now(dt.timezone.utc).timestamp())

    def forged(lifetime: int) -> str:
        claims = {"iss": "mp4totext", "sub": "u", "tid": tenant, "iat": now, "exp": now + lifetime, "jti": "j"}
        return jwt.encode(claims, key.secret, algorithm="HS256", headers={"kid": key.id})

    verifier = identity.Verifier(0, max_ttl_s=3600)
    assert verifier.verify(forged(3600 + identity.LEEWAY_S)).user == "u"
    with pytest.raises(identity.TokenError, match="longer than"):
        verifier.verify(forged(365 * 86400))
