"""Which scope an end-user token needs for each RPC, in one explicit table.

Every RPC the server registers must be named here; one that is not is refused for every
caller (default-deny), so a new RPC (e.g. a search) cannot silently fall to the wrong scope.
tests/unit/test_scopes.py checks the table against the services in protos/.
"""

from __future__ import annotations

READ, WRITE = "read", "write"

_V1 = "/mp4totext.v1."

SCOPES: dict[str, str] = {
    _V1 + "MediaService/UploadMedia": WRITE,
    _V1 + "MediaService/GetMedia": READ,
    _V1 + "MediaService/ListMedia": READ,
    _V1 + "MediaService/DeleteMedia": WRITE,
    _V1 + "MediaService/CreateUploadSession": WRITE,
    _V1 + "MediaService/GetUploadSession": READ,
    _V1 + "MediaService/WriteUpload": WRITE,
    _V1 + "MediaService/DeleteUploadSession": WRITE,
    _V1 + "TranscriptionService/CreateTranscription": WRITE,
    _V1 + "TranscriptionService/GetTranscription": READ,
    _V1 + "TranscriptionService/ListTranscriptions": READ,
    _V1 + "TranscriptionService/CancelTranscription": WRITE,
    _V1 + "TranscriptionService/DeleteTranscription": WRITE,
    _V1 + "TranscriptionService/WatchTranscription": READ,
    _V1 + "TranscriptionService/ExportTranscription": READ,
    _V1 + "TranscriptionService/GetCapabilities": READ,
    _V1 + "TranscriptionService/EnhanceTranscription": WRITE,
    _V1 + "UsageService/GetUsage": READ,
    _V1 + "LiveService/StreamLive": WRITE,
    _V1 + "LiveService/GetLiveSession": READ,
    # Tenant administration: the handlers refuse end-user tokens outright; the scope is a second line.
    _V1 + "IdentityService/CreateUserToken": WRITE,
    _V1 + "IdentityService/RotateTokenKey": WRITE,
    _V1 + "IdentityService/RevokeUserTokens": WRITE,
    _V1 + "WebhookService/CreateWebhookEndpoint": WRITE,
    _V1 + "WebhookService/GetWebhookEndpoint": READ,
    _V1 + "WebhookService/ListWebhookEndpoints": READ,
    _V1 + "WebhookService/UpdateWebhookEndpoint": WRITE,
    _V1 + "WebhookService/DeleteWebhookEndpoint": WRITE,
    _V1 + "WebhookService/RotateWebhookSecret": WRITE,
    _V1 + "WebhookService/ListWebhookDeliveries": READ,
    _V1 + "WebhookService/RedeliverWebhook": WRITE,
}


def scope_for(method: str) -> str | None:
    """The scope ``method`` (a full gRPC method name) needs, or None when it is not registered."""
    return SCOPES.get(method)
