"""One exception tree for the whole platform, rendered as one JSON error shape."""

from __future__ import annotations

from typing import Any


class MiaasError(Exception):
    """Root of every error a service raises on purpose; carries its HTTP status and a stable code."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, details: Any = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if code is not None:
            self.code = code

    def to_body(self) -> dict[str, Any]:
        """The one error body: {"error": {"code", "message", "details"}}."""
        return {"error": {"code": self.code, "message": self.message, "details": self.details}}


class BadRequest(MiaasError):
    status, code = 400, "bad_request"


class Unauthorized(MiaasError):
    status, code = 401, "unauthorized"


class Forbidden(MiaasError):
    status, code = 403, "forbidden"


class NotFound(MiaasError):
    status, code = 404, "not_found"


class Conflict(MiaasError):
    status, code = 409, "conflict"


class PayloadTooLarge(MiaasError):
    status, code = 413, "payload_too_large"


class Unavailable(MiaasError):
    status, code = 503, "unavailable"


class InsufficientStorage(MiaasError):
    """The service's storage is full (no space left on the device, or a quota): retry once space is freed."""

    status, code = 507, "insufficient_storage"


class UpstreamError(MiaasError):
    """Another service failed or could not be reached."""

    status, code = 502, "upstream_error"


class RemoteError(MiaasError):
    """An error answered by another MIaaS service, passed on with its status, code and message."""

    def __init__(self, status: int, code: str, message: str, details: Any = None) -> None:
        super().__init__(message, details=details, code=code)
        self.status = status
