"""Every error the gateway answers with, and the JSON body they all share.

    GatewayError (500 internal_error)
    ├── InvalidRequest        400 invalid_request       a field is wrong (names it in `param`)
    ├── AuthenticationFailed  401 authentication_error
    ├── PermissionDenied      403 permission_denied
    ├── ModelNotFound         404 not_found             unknown model id
    ├── RouteNotFound         404 not_found             unknown path
    ├── MethodNotAllowed      405 method_not_allowed
    ├── Conflict              409 conflict              e.g. a custom model id that is already registered
    ├── PayloadTooLarge       413 payload_too_large
    ├── RateLimited           429 rate_limited          (with Retry-After)
    ├── InferenceFailed       502 upstream_error        Triton answered with an error
    │   └── AdapterNotCached                             a LoRA task id the server no longer has (resent)
    ├── UpstreamUnavailable   503 service_unavailable   Triton unreachable or the model not ready
    │   └── ReplicaFailure                               one replica failed (it is marked down):
    │       ├── ReplicaUnreachable                       its connection failed
    │       └── ModelUnhealthy                           a model's Python stub crashed (Triton still says ready)
    └── DeadlineExceeded      504 timeout

The error middleware renders any of them as
`{"error": {"status", "type", "message", "param", "request_id"}}`; after an SSE stream has started the same
body goes out as an `event: error`.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    status: ClassVar[int] = 500
    type: ClassVar[str] = "internal_error"

    def __init__(self, message: str, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self, request_id: str) -> dict[str, Any]:
        return {
            "error": {
                "status": self.status,
                "type": self.type,
                "message": self.message,
                "param": self.param,
                "request_id": request_id,
            }
        }


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_denied"


class ModelNotFound(GatewayError):
    status = 404
    type = "not_found"


class RouteNotFound(GatewayError):
    status = 404
    type = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "method_not_allowed"


class Conflict(GatewayError):
    status = 409
    type = "conflict"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "payload_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limited"


class InferenceFailed(GatewayError):
    status = 502
    type = "upstream_error"


class AdapterNotCached(InferenceFailed):
    """The server's LoRA cache lacks the adapter's task id (evicted, or the server restarted): the gateway sends
    the weights again instead of answering with this."""


class UpstreamUnavailable(GatewayError):
    status = 503
    type = "service_unavailable"


class DeadlineExceeded(GatewayError):
    status = 504
    type = "timeout"


class ReplicaFailure(UpstreamUnavailable):
    """One Triton replica failed. `address` is for logs and health, never for the client."""

    def __init__(self, message: str, address: str) -> None:
        super().__init__(message)
        self.address = address


class ReplicaUnreachable(ReplicaFailure):
    """The connection to the replica failed."""


class ModelUnhealthy(ReplicaFailure):
    """Triton answered that a model's Python-backend stub process is not healthy: it crashed, and Triton keeps
    reporting the model ready, so only a real request finds out."""
