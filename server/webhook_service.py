"""mp4totext.v1.WebhookService: the tenant's webhook endpoints, secrets and delivery log.

Thin: core.webhooks holds the checks (SSRF, event types), signing and the delivery state
machine; the deliver_webhook actor sends. Every RPC needs the tenant's API key.
"""
from __future__ import annotations

import functools
from typing import Any

import grpc
import peewee as pw

from core import runtime, webhooks
from mp4totext.v1 import webhooks_pb2 as wpb
from mp4totext.v1 import webhooks_pb2_grpc
from server import auth
from server.convert import ts
from server.errors import failed_precondition, invalid, not_found
from server.paging import page_size, paged
from server.validation import enum_filter, is_name, parse_name
from storage.db import connection, locked, utcnow
from storage.tenancy import WebhookDelivery, WebhookEndpoint

ENDPOINTS, DELIVERIES, EVENTS = "webhookEndpoints", "webhookDeliveries", "webhookEvents"
MAX_DESCRIPTION = 1024
UPDATABLE = ("url", "event_types", "description", "disabled")


@functools.lru_cache(maxsize=8)
def _allow(text: str) -> tuple:
    return webhooks.parse_nets(text)


def _check_url(url: str) -> str:
    """SSRF and syntax checks at creation/update (the worker checks again at every delivery)."""
    try:
        webhooks.resolve_target(url, _allow(runtime.get().settings.webhook_allow_nets))
    except webhooks.TargetRefused as exc:
        raise invalid(f"webhook_endpoint.url: {exc}") from None
    return url


def _event_types(types: Any) -> list[str]:
    try:
        return webhooks.check_event_types(types)
    except webhooks.TargetRefused as exc:
        raise invalid(f"webhook_endpoint.event_types: {exc}") from None


def _description(text: str) -> str:
    if len(text) > MAX_DESCRIPTION or "\x00" in text:
        raise invalid(f"webhook_endpoint.description must be at most {MAX_DESCRIPTION} characters, without NUL")
    return text


def endpoint_to_proto(e: WebhookEndpoint) -> wpb.WebhookEndpoint:
    msg = wpb.WebhookEndpoint(name=f"{ENDPOINTS}/{e.id}", url=e.url, event_types=list(e.event_types or []),
                              description=e.description, disabled=e.disabled, disabled_reason=e.disabled_reason)
    for field, value in (("create_time", e.create_time), ("update_time", e.update_time),
                         ("previous_secret_expire_time", e.previous_secret_expire_time if e.previous_secret else None)):
        if value is not None:
            getattr(msg, field).CopyFrom(ts(value))
    return msg


def delivery_to_proto(d: WebhookDelivery) -> wpb.WebhookDelivery:
    msg = wpb.WebhookDelivery(name=f"{DELIVERIES}/{d.id}", endpoint=f"{ENDPOINTS}/{d.endpoint_id}",
                              event=f"{EVENTS}/{d.event_id}", event_type=d.event_type,
                              webhook_id=webhooks.webhook_id(d.event_id),
                              state=wpb.WebhookDeliveryState.Value(f"WEBHOOK_DELIVERY_STATE_{d.state}"),
                              attempt_count=d.attempts, last_status_code=d.last_status_code, last_error=d.last_error)
    for field, value in (("next_attempt_time", d.next_attempt_time if d.state == webhooks.PENDING else None),
                         ("last_attempt_time", d.last_attempt_time), ("create_time", d.create_time)):
        if value is not None:
            getattr(msg, field).CopyFrom(ts(value))
    return msg


def _endpoint(name: str, field: str = "name") -> WebhookEndpoint:
    endpoint_id = parse_name(name, ENDPOINTS, field)
    with connection():
        row = WebhookEndpoint.get_or_none(WebhookEndpoint.id == endpoint_id,
                                          WebhookEndpoint.tenant == auth.current_tenant.get())
    if row is None:
        raise not_found(f"{ENDPOINTS}/{endpoint_id}")
    return row


class WebhookService(webhooks_pb2_grpc.WebhookServiceServicer):
    def CreateWebhookEndpoint(self, request: wpb.CreateWebhookEndpointRequest, context: grpc.ServicerContext):
        auth.require_tenant_key(context)
        tenant, spec = auth.current_tenant.get(), request.webhook_endpoint
        if len(request.request_id) > 128:
            raise invalid("request_id must be at most 128 characters")
        if request.request_id:
            found = self._by_request_id(tenant, request.request_id)
            if found is not None:  # a retry (its first answer may be lost): the same answer, secret included
                return self._created(found)
        url, types = _check_url(spec.url), _event_types(spec.event_types)
        try:
            with locked():
                row = WebhookEndpoint.create(tenant=tenant, request_id=request.request_id or None, url=url,
                                             event_types=types, description=_description(spec.description),
                                             disabled=spec.disabled, secret=webhooks.new_secret())
        except pw.IntegrityError:  # the same request_id won a race
            return self._created(self._by_request_id(tenant, request.request_id))
        return self._created(row)

    @staticmethod
    def _created(row: WebhookEndpoint) -> wpb.CreateWebhookEndpointResponse:
        """The endpoint with its current secret (the tenant's own, asked for with its API key)."""
        return wpb.CreateWebhookEndpointResponse(webhook_endpoint=endpoint_to_proto(row), secret=row.secret)

    @staticmethod
    def _by_request_id(tenant: str, request_id: str) -> WebhookEndpoint | None:
        with connection():
            return WebhookEndpoint.get_or_none(WebhookEndpoint.tenant == tenant,
                                               WebhookEndpoint.request_id == request_id)

    def GetWebhookEndpoint(self, request: wpb.GetWebhookEndpointRequest, context: grpc.ServicerContext):
        auth.require_tenant_key(context)
        return endpoint_to_proto(_endpoint(request.name))

    def ListWebhookEndpoints(self, request: wpb.ListWebhookEndpointsRequest, context: grpc.ServicerContext):
        auth.require_tenant_key(context)
        query = WebhookEndpoint.select().where(WebhookEndpoint.tenant == auth.current_tenant.get())
        rows, nxt = paged(query, WebhookEndpoint, page_size(request.page_size), request.page_token, {})
        return wpb.ListWebhookEndpointsResponse(webhook_endpoints=[endpoint_to_proto(r) for r in rows],
                                                next_page_token=nxt)

    def UpdateWebhookEndpoint(self, request: wpb.UpdateWebhookEndpointRequest, context: grpc.ServicerContext):
        auth.require_tenant_key(context)
        spec, paths = request.webhook_endpoint, list(request.update_mask.paths)
        row = _endpoint(spec.name, "webhook_endpoint.name")
        if not paths:
            raise invalid(f"update_mask is required: name the fields to change ({', '.join(UPDATABLE)})")
        unknown = [p for p in paths if p not in UPDATABLE]
        if unknown:
            raise invalid(f"update_mask: {unknown} cannot be changed; choose from {', '.join(UPDATABLE)}")
        fields: dict[str, Any] = {"update_time": utcnow()}
        if "url" in paths:
            fields["url"] = _check_url(spec.url)
        if "event_types" in paths:
            fields["event_types"] = _event_types(spec.event_types)
        if "description" in paths:
            fields["description"] = _description(spec.description)
        if "disabled" in paths:
            fields["disabled"] = spec.disabled
            fields["disabled_reason"] = ""
        with locked():
            WebhookEndpoint.update(**fields).where(WebhookEndpoint.id == row.id).execute()
        return endpoint_to_proto(_endpoint(spec.name, "webhook_endpoint.name"))

    def DeleteWebhookEndpoint(self, request: wpb.DeleteWebhookEndpointRequest, context: grpc.ServicerContext):
        auth.require_tenant_key(context)
        row = _endpoint(request.name)
        with locked():  # its deliveries go with it (a running attempt then records nothing)
            WebhookDelivery.delete().where(WebhookDelivery.endpoint == row.id).execute()
            WebhookEndpoint.delete().where(WebhookEndpoint.id == row.id).execute()
        return wpb.DeleteWebhookEndpointResponse()

    def RotateWebhookSecret(self, request: wpb.RotateWebhookSecretRequest, context: grpc.ServicerContext):
        auth.require_tenant_key(context)
        row = _endpoint(request.name)
        try:
            secret, row = webhooks.rotate_secret(row, runtime.get().settings.webhook_secret_grace_s)
        except LookupError:
            raise not_found(request.name) from None
        return wpb.RotateWebhookSecretResponse(secret=secret, previous_secret_expire_time=ts(
            row.previous_secret_expire_time), webhook_endpoint=endpoint_to_proto(row))

    def ListWebhookDeliveries(self, request: wpb.ListWebhookDeliveriesRequest, context: grpc.ServicerContext):
        auth.require_tenant_key(context)
        query = WebhookDelivery.select().where(WebhookDelivery.tenant == auth.current_tenant.get())
        filters: dict[str, Any] = {}
        if request.parent:
            filters["parent"] = _endpoint(request.parent, "parent").id
            query = query.where(WebhookDelivery.endpoint == filters["parent"])
        if request.event:
            filters["event"] = parse_name(request.event, EVENTS, "event")
            query = query.where(WebhookDelivery.event == filters["event"])
        state = enum_filter(request.state, wpb.WebhookDeliveryState, "WEBHOOK_DELIVERY_STATE_", "state")
        if state is not None:
            filters["state"] = state
            query = query.where(WebhookDelivery.state == state)
        rows, nxt = paged(query, WebhookDelivery, page_size(request.page_size), request.page_token, filters)
        return wpb.ListWebhookDeliveriesResponse(webhook_deliveries=[delivery_to_proto(r) for r in rows],
                                                 next_page_token=nxt)

    def RedeliverWebhook(self, request: wpb.RedeliverWebhookRequest, context: grpc.ServicerContext):
        auth.require_tenant_key(context)
        tenant = auth.current_tenant.get()
        if is_name(request.name, EVENTS):
            ids = webhooks.deliveries_of_event(tenant, request.name[len(EVENTS) + 1:])
        else:
            if not is_name(request.name, DELIVERIES):
                raise invalid(f"name={request.name[:100]!r} is not a valid resource name; expected "
                              f"{DELIVERIES}/<id> or {EVENTS}/<id>")
            ids = [request.name[len(DELIVERIES) + 1:]]
        with connection():
            rows = list(WebhookDelivery.select(WebhookDelivery, WebhookEndpoint.disabled).join(WebhookEndpoint)
                        .where(WebhookDelivery.id.in_(ids), WebhookDelivery.tenant == tenant))
        if not rows:
            raise not_found(request.name)
        disabled = [f"{ENDPOINTS}/{r.endpoint_id}" for r in rows if r.endpoint.disabled]
        if disabled:
            raise failed_precondition(f"{', '.join(sorted(set(disabled)))} is disabled; enable it "
                                      "(UpdateWebhookEndpoint with disabled=false) and redeliver again")
        done = webhooks.redeliver(tenant, [r.id for r in rows])
        return wpb.RedeliverWebhookResponse(webhook_deliveries=[delivery_to_proto(r) for r in done])
