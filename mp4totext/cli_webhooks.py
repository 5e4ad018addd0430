"""``mp4totext webhooks ...``: the tenant's webhook endpoints and delivery log (tenant API key).

    mp4totext webhooks create URL --events transcription.succeeded,transcription.failed
    mp4totext webhooks list | deliveries [--endpoint webhookEndpoints/ID] | redeliver NAME
    mp4totext webhooks rotate webhookEndpoints/ID | delete webhookEndpoints/ID
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable

from google.protobuf import json_format

from mp4totext.v1 import webhooks_pb2 as wpb

EVENT_TYPES = ("transcription.succeeded", "transcription.failed", "transcription.cancelled",
               "enhancement.succeeded", "enhancement.failed", "enhancement.cancelled", "media.failed")


def _dump(msg: Any) -> dict[str, Any]:
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def _run(args: argparse.Namespace, client_of: Callable[[argparse.Namespace], Any]) -> int:
    with client_of(args) as client:
        if args.action == "create":
            events = [e.strip() for e in (args.events or "").split(",") if e.strip()]
            resp = client.create_webhook(args.url, events, args.description or "")
            print(json.dumps({**_dump(resp.webhook_endpoint), "secret": resp.secret}, indent=2))
            print("keep the secret: it is shown only now (verify the webhook-signature header with it)",
                  file=sys.stderr)
        elif args.action == "list":
            print(json.dumps([_dump(e) for e in client.list_webhooks()], indent=2))
        elif args.action == "deliveries":
            print(json.dumps([_dump(d) for d in client.webhook_deliveries(args.endpoint or "", args.event or "")],
                             indent=2))
        elif args.action == "redeliver":
            print(json.dumps([_dump(d) for d in client.redeliver_webhook(args.name)], indent=2))
        elif args.action == "rotate":
            resp = client.call(client.webhooks.RotateWebhookSecret, wpb.RotateWebhookSecretRequest(name=args.name))
            print(json.dumps({"secret": resp.secret,
                              "previous_secret_expire_time": resp.previous_secret_expire_time.ToJsonString()}))
        elif args.action == "delete":
            client.call(client.webhooks.DeleteWebhookEndpoint, wpb.DeleteWebhookEndpointRequest(name=args.name))
            print(f"deleted {args.name}")
    return 0


def add(sub: Any, client_args: Callable[[argparse.ArgumentParser], None],
        client_of: Callable[[argparse.Namespace], Any]) -> None:
    """Add ``webhooks`` and its actions to an argparse subparsers object."""
    hooks = sub.add_parser("webhooks", help="webhook endpoints and their delivery log (tenant API key)")
    actions = hooks.add_subparsers(dest="action", required=True)
    sp = actions.add_parser("create", help="a new endpoint; prints its signing secret once")
    sp.add_argument("url", help="https://... where events are POSTed (Standard Webhooks)")
    sp.add_argument("--events", help=f"comma-separated, from {', '.join(EVENT_TYPES)} (default: all)")
    sp.add_argument("--description", default="")
    parsers = [sp]
    parsers.append(actions.add_parser("list", help="the tenant's endpoints"))
    sp = actions.add_parser("deliveries", help="the delivery log, newest first")
    sp.add_argument("--endpoint", help="only this webhookEndpoints/ID")
    sp.add_argument("--event", help="only this webhookEvents/ID")
    parsers.append(sp)
    for action, helptext in (("redeliver", "send webhookDeliveries/ID (or every delivery of webhookEvents/ID) again"),
                             ("rotate", "new secret for webhookEndpoints/ID (the old one signs 24 h more)"),
                             ("delete", "delete webhookEndpoints/ID")):
        sp = actions.add_parser(action, help=helptext)
        sp.add_argument("name")
        parsers.append(sp)
    for sp in parsers:
        client_args(sp)
        sp.set_defaults(fn=lambda args: _run(args, client_of))
