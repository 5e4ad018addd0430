"""List paging: page sizes and opaque page tokens bound to the listing's filters (keyset paging)."""
from __future__ import annotations

import base64
import datetime as dt
import json
from typing import Any

import peewee as pw

from server.auth import current_user
from server.errors import invalid
from server.validation import is_id
from storage.db import connection

MAX_PAGE = 1000
DEFAULT_PAGE = 50


def page_size(n: int) -> int:
    if n < 0:
        raise invalid("page_size must not be negative")
    return min(n or DEFAULT_PAGE, MAX_PAGE)


def encode_token(row: Any, filters: dict[str, Any]) -> str:
    payload = {"t": row.create_time.isoformat(), "id": row.id, "f": filters}
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode()


def apply_token(query: pw.ModelSelect, model: Any, token: str, filters: dict[str, Any]) -> pw.ModelSelect:
    if not token:
        return query
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        t, last_id = dt.datetime.fromisoformat(data["t"]), data["id"]
        if not (is_id(last_id) and isinstance(data.get("f", {}), dict)):
            raise ValueError("forged")
    except Exception:
        raise invalid("page_token is not valid; pass next_page_token from a previous response") from None
    if data.get("f") != filters:
        raise invalid("page_token was issued for different filters; restart the listing without it")
    return query.where((model.create_time < t) | ((model.create_time == t) & (model.id < last_id)))


def paged(query: pw.ModelSelect, model: Any, size: int, token: str, filters: dict[str, Any]) -> tuple[list, str]:
    """One page of ``query`` (newest first) and the token of the next page ("" at the end)."""
    q = apply_token(query, model, token, filters).order_by(model.create_time.desc(), model.id.desc())
    with connection():
        rows = list(q.limit(size + 1))
    nxt = encode_token(rows[size - 1], filters) if len(rows) > size else ""
    return rows[:size], nxt


def tenant_listing(model: Any, tenant: str, state: str | None, without: tuple[str, ...] = ()
                   ) -> tuple[pw.ModelSelect, dict[str, Any]]:
    """A tenant's rows of ``model`` (in ``state`` if given; the columns named in ``without`` not
    read) and the filters a page token is bound to."""
    fields = [f for f in model._meta.sorted_fields if f.name not in without]
    query = model.select(*fields).where(model.tenant == tenant)
    user = current_user.get("")
    if user:  # an end-user token lists only its own rows (server.resources.visible)
        query = query.where(model.owner == user)
    if state is None:
        return query, {}
    return query.where(model.state == state), {"state": state}
