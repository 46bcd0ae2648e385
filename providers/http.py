"""Shared adapter plumbing: HTTP with a timeout on every call, vendor errors onto ours, settings."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.structures import CaseInsensitiveDict

from pipeline.provider import GenerationRequest
from pipeline.provider_errors import (
    AuthError,
    NotConfiguredError,
    ProviderError,
    QuotaExhaustedError,
    RejectedError,
    TransientError,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 60.0
MAX_MESSAGE = 500
# Keep-alive connections kept per vendor host. A SaaS node's threads share one session
# per provider, and requests keeps 10 by default: at a concurrency of 100, 90 calls of
# every wave opened a new connection (a TCP and, for a real vendor, a TLS handshake) and
# threw it away after. Connections are opened only as calls need them.
POOL_SIZE = 128
# A malformed base URL or key: configuration to fix, not something to retry.
CONFIGURATION_ERRORS = (
    requests.exceptions.InvalidURL,
    requests.exceptions.MissingSchema,
    requests.exceptions.InvalidSchema,
    requests.exceptions.InvalidHeader,
)
# Header values that carry a credential; whatever a vendor echoes back of them is scrubbed.
SECRET_HEADERS = frozenset({"authorization", "x-api-key", "xi-api-key"})

# What a status means when the vendor's own code table says nothing more precise.
STATUS_ERRORS: dict[int, type[ProviderError]] = {
    401: AuthError,
    402: QuotaExhaustedError,
    403: AuthError,
    408: TransientError,
    409: TransientError,
    425: TransientError,
    429: TransientError,
}

# A vendor's body parser: (candidate error codes, human message) from the decoded body.
Describe = Callable[[Any], tuple[Iterable[str], str]]


def error_class(status: int) -> type[ProviderError]:
    """The default error for an HTTP status: 5xx is transient, other 4xx is a rejection."""
    return STATUS_ERRORS.get(status) or (TransientError if status >= 500 else RejectedError)


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` (OpenAI) or `retry-after` (seconds or an HTTP date)."""
    headers = CaseInsensitiveDict(headers)
    wait_ms = _number(headers.get("retry-after-ms") or "")
    if wait_ms is not None:
        return wait_ms / 1000
    raw = headers.get("retry-after")
    if not raw:
        return None
    wait = _number(raw)
    if wait is not None:
        return wait
    try:
        when = parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(when.timestamp() - (time.time() if now is None else now), 0.0)


def _number(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return max(value, 0.0) if math.isfinite(value) else None


def redact(text: str, secrets: Iterable[str]) -> str:
    """The text with every secret replaced, cut to a length fit for an error message."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE] + "..."


def require_api_key(request: GenerationRequest, provider: str) -> str:
    """The job's API key for this provider, or NotConfiguredError."""
    key = (request.credentials.get("api_key") or "").strip()
    if not key:
        raise NotConfiguredError(
            f"{provider}: no api_key in the job's credentials", provider=provider
        )
    return key


def body_of(response: requests.Response) -> Any:
    """The decoded JSON body, or the text when it is not JSON."""
    try:
        return response.json()
    except ValueError:
        return response.text


def _session() -> requests.Session:
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


class HttpClient:
    """One vendor's endpoint: every call has a timeout, and trouble comes back as our errors."""

    def __init__(
        self,
        provider: str,
        base_url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        session: requests.Session | None = None,
        describe: Describe,
        codes: Mapping[str, type[ProviderError]] | None = None,
        statuses: Mapping[int, type[ProviderError]] | None = None,
        rate_limit_wait: float | None = None,
    ):
        self.provider = provider
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        # Shared by every company: credentials go on each request, never on the session.
        self.session = session or _session()
        # Calls to the vendor's own host go on a session that does not read the
        # environment, with the proxy and CA bundle settings read once for that host.
        # Left to itself, requests reads them on every call (each *_proxy variable,
        # NO_PROXY, the netrc file): a third of its own CPU per call. Other hosts (signed
        # download URLs, and where they redirect) keep `session`, which reads them per
        # call as before, as does a session handed in.
        self._api_session, self._environment = self.session, {}
        if session is None:
            self._environment = self.session.merge_environment_settings(
                self.base_url, {}, None, None, None)
            self._api_session = _session()
            self._api_session.trust_env = False
        self.describe = describe
        self.codes = codes or {}
        self.statuses = statuses or {}
        self.rate_limit_wait = rate_limit_wait

    def __repr__(self) -> str:
        return f"HttpClient({self.provider!r}, {self.base_url!r})"

    def send(
        self, method: str, path: str, *, allow: Iterable[int] = (), **kwargs: Any
    ) -> requests.Response:
        """Call `path` (or an absolute URL); non-2xx statuses not in `allow` raise our error."""
        own_host = not path.startswith(("http://", "https://"))
        url = self.base_url + path if own_host else path
        secrets = _secrets(kwargs.get("headers"))
        where = _where(url)
        # requests drops only Authorization on a redirect to another host; an x-api-key
        # header would follow it anywhere. Calls carrying a key do not follow redirects.
        kwargs.setdefault("allow_redirects", not secrets)
        session = self._api_session if own_host else self.session
        if own_host:
            for name, value in self._environment.items():
                kwargs.setdefault(name, value)
        started = time.monotonic()
        try:
            response = session.request(method, url, timeout=self.timeout, **kwargs)
        except CONFIGURATION_ERRORS as exc:
            raise NotConfiguredError(
                redact(f"{self.provider}: {type(exc).__name__} for {where}", secrets),
                provider=self.provider,
            ) from None
        except requests.Timeout:
            # `from None`: a requests exception holds the prepared request, headers and all.
            raise TransientError(
                f"{self.provider}: no response from {where} within {self.timeout}s",
                provider=self.provider,
            ) from None
        except requests.RequestException as exc:
            raise TransientError(
                redact(f"{self.provider}: {type(exc).__name__} calling {where}", secrets),
                provider=self.provider,
            ) from None
        elapsed = time.monotonic() - started
        log.debug(
            "%s %s %s: %s in %.3fs", self.provider, method, where, response.status_code, elapsed
        )
        if response.is_redirect:
            raise NotConfiguredError(
                f"{self.provider}: {where} redirects to "
                f"{_where(response.headers.get('location', ''))}; configure the final URL",
                provider=self.provider,
                status=response.status_code,
            )
        if response.ok or response.status_code in allow:
            return response
        raise self.error(response, secrets)

    def error(self, response: requests.Response, secrets: Iterable[str] = ()) -> ProviderError:
        """Our error for a failed response, from the vendor's code table, then its status."""
        status = response.status_code
        codes, message = self.describe(body_of(response))
        cls = next((self.codes[c] for c in codes if c in self.codes), None)
        cls = cls or self.statuses.get(status) or error_class(status)
        text = redact(f"{self.provider} {status}: {message or response.reason}", secrets)
        if issubclass(cls, TransientError):
            wait = parse_retry_after(response.headers)
            if wait is None and status == 429:
                wait = self.rate_limit_wait
            return cls(text, retry_after=wait, provider=self.provider, status=status)
        return cls(text, provider=self.provider, status=status)

    def download(self, url: str) -> requests.Response:
        """GET a signed output URL, without our credentials (they are for the API host only).

        Any failure is transient: signed URLs expire, and the next poll mints a fresh one.
        """
        response = self.send("GET", url, allow=range(400, 600))
        if not response.ok:
            raise TransientError(
                f"{self.provider}: download from {_where(url)} failed with {response.status_code}",
                provider=self.provider,
                status=response.status_code,
            )
        return response

    def json(self, response: requests.Response) -> dict[str, Any]:
        """A success body that must be a JSON object; anything else is the vendor's glitch."""
        body = body_of(response)
        if not isinstance(body, dict):
            raise TransientError(
                f"{self.provider}: expected a JSON object from {_where(response.url)}",
                provider=self.provider,
                status=response.status_code,
            )
        return body


def _secrets(headers: Mapping[str, str] | None) -> list[str]:
    # The token alone, without a "Bearer " scheme in front.
    items = (headers or {}).items()
    return [value.split(" ")[-1] for name, value in items if name.lower() in SECRET_HEADERS]


def _where(url: str) -> str:
    # Host and path only: signed download URLs carry their signature in the query.
    parts = urlsplit(url)
    return f"{parts.netloc}{parts.path}"


class Settings:
    """A job's settings read with validation; a bad value is a RejectedError naming it."""

    def __init__(self, provider: str, settings: Mapping[str, Any]):
        self.provider = provider
        self.values = settings

    def reject(self, name: str, wants: str) -> RejectedError:
        shown = repr(self.values.get(name))[:60]
        return RejectedError(
            f"{self.provider}: setting '{name}' must be {wants}, got {shown}",
            provider=self.provider,
        )

    def integer(self, name: str, default: int | None, low: int, high: int) -> int | None:
        value = self.values.get(name)
        if value is None:
            return default
        # bool is an int subclass; True as a duration is a client bug, not 1.
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise self.reject(name, f"a whole number from {low} to {high}")
        return value

    def number(self, name: str, default: float | None, low: float, high: float) -> float | None:
        value = self.values.get(name)
        if value is None:
            return default
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        if not numeric or not low <= value <= high:
            raise self.reject(name, f"a number from {low} to {high}")
        return float(value)

    def choice(self, name: str, default: str, choices: Iterable[str]) -> str:
        value = self.values.get(name)
        if value is None:
            return default
        allowed = list(choices)
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # JSON clients send 8 where the vendor's enum says "8"
        if value not in allowed:
            raise self.reject(name, "one of " + ", ".join(allowed))
        return value

    def text(self, name: str, default: str | None, max_length: int = 10_000) -> str | None:
        value = self.values.get(name)
        if value is None:
            return default
        if not isinstance(value, str) or len(value) > max_length:
            raise self.reject(name, f"a string of at most {max_length} characters")
        return value

    def flag(self, name: str, default: bool) -> bool:
        value = self.values.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.reject(name, "true or false")
        return value
