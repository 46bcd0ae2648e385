"""Domain errors: each carries the stable code and HTTP status clients see."""

from __future__ import annotations

from decimal import Decimal


class PipelineError(Exception):
    """Base of every error the API turns into the `{"error", "code", "details"}` envelope."""

    status = 500
    code = "INTERNAL_ERROR"

    def __init__(self, message: str, *, details: dict | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or {}
        if code:
            self.code = code


class ValidationFailed(PipelineError):
    status = 400
    code = "VALIDATION_ERROR"


class Unauthorized(PipelineError):
    status = 401
    code = "UNAUTHORIZED"


class Forbidden(PipelineError):
    status = 403
    code = "FORBIDDEN"


class NotFound(PipelineError):
    status = 404
    code = "NOT_FOUND"

    def __init__(self, code: str, message: str, *, details: dict | None = None):
        super().__init__(message, details=details, code=code)


class InsufficientCredits(PipelineError):
    status = 402
    code = "INSUFFICIENT_CREDITS"

    def __init__(self, needed: Decimal, available: Decimal | None = None):
        details = {"required": str(needed)}
        if available is not None:
            details["available"] = str(available)
        super().__init__("Not enough credits to cover this job.", details=details)


class LedgerConflict(PipelineError):
    """A ledger key was replayed with a different amount or type: refused, never charged."""

    status = 409
    code = "LEDGER_CONFLICT"

    def __init__(self, key: str, existing: str, attempted: str):
        super().__init__(
            f"Ledger entry {key} already exists with different terms.",
            details={"key": key, "existing": existing, "attempted": attempted},
        )


class Conflict(PipelineError):
    status = 409
    code = "CONFLICT"
