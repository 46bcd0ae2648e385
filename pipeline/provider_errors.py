"""The small tree every provider error is mapped onto at the adapter's edge."""

from __future__ import annotations


class ProviderError(Exception):
    """Base of every error an adapter raises; `code` is the stable word clients see."""

    code = "PROVIDER_ERROR"
    retryable = False

    def __init__(self, message: str, *, provider: str = "", status: int | None = None):
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.status = status


class TransientError(ProviderError):
    """Rate limits, 5xx, timeouts, dropped connections: worth another try, after a wait."""

    code = "PROVIDER_UNAVAILABLE"
    retryable = True

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs):
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class RejectedError(ProviderError):
    """The provider refused this input (bad parameters, content filtered): fail and refund."""

    code = "PROVIDER_REJECTED"


class ContentFilteredError(RejectedError):
    """The provider's safety filter refused the prompt or the output."""

    code = "CONTENT_FILTERED"


class QuotaExhaustedError(ProviderError):
    """Our account at the provider is out of credits: no retry, operators must act."""

    code = "PROVIDER_QUOTA_EXHAUSTED"


class AuthError(ProviderError):
    """The provider refused our credentials: no retry."""

    code = "PROVIDER_AUTH_FAILED"


class NotConfiguredError(ProviderError):
    """No credentials or endpoint are configured for this provider."""

    code = "PROVIDER_NOT_CONFIGURED"
