"""Rate limits per API key and per company (flask-limiter), answered 429 in the envelope.

Every authenticated request counts once against its key's budget (RATE_LIMIT_PER_KEY)
and once against its company's, shared by all the company's keys (RATE_LIMIT_PER_COMPANY,
or the company's entry in RATE_LIMIT_COMPANY_OVERRIDES). flask-limiter's own
before-request check runs ahead of the gate (api/gate.py): its request filter
authenticates the caller, so a request without a valid key is left to the gate's 401
and counts against nobody, while one with a key counts even when the gate then refuses
its scope (403) or its body (400, 413, 415). The public blueprints (health, metrics,
docs, signed file links) are never limited.

The hot path costs three storage round trips per authenticated request: one per budget
(the sliding-window counter's acquire is one Lua call) and one to read the window of the
budget the headers show. Which one they show is decided from the configuration, not
from reading both.

Counters live in RATE_LIMIT_STORAGE_URL; by default in memory in the embedded mode, and
in the broker's Redis, under its key prefix, when the broker is Redis (every API
process then shares them). The limiter never turns a request into a 500: when its
storage fails it counts in this process's memory, and tries the storage again later.
"""

from __future__ import annotations

import logging
import math
import time

from flask import g, request
from flask_limiter import ApplicationLimit, Limiter, RateLimitExceeded, RequestLimit
from limits import parse_many

from api.auth import current_principal
from api.errors import envelope
from api.gate import PUBLIC_BLUEPRINTS
from pipeline.config import ConfigError, Settings

log = logging.getLogger("pipeline.api")

KEY_SCOPE = "key"
COMPANY_SCOPE = "company"
HEADER_LIMIT = "RateLimit-Limit"
HEADER_REMAINING = "RateLimit-Remaining"
HEADER_RESET = "RateLimit-Reset"
_REDIS_SCHEMES = ("redis://", "rediss://", "redis+unix://", "unix://")
# A storage that does not answer must not hold requests up: the limiter then counts in
# memory and looks at the storage again after a back-off.
_REDIS_TIMEOUT_SECONDS = 0.5
# One Lua call per hit and one per window read (the fixed window needs a GET and a TTL
# to read one), and no burst of twice the limit across a window's edge.
STRATEGY = "sliding-window-counter"
_warned_memory = False


def storage_of(settings: Settings) -> tuple[str, dict]:
    """The limiter's storage URL and its options, from the settings (README, Rate limits)."""
    url = settings.rate_limit_storage_url
    if not url:
        if settings.embedded:
            url = "memory://"
        elif settings.broker_url.startswith(_REDIS_SCHEMES):
            url = settings.broker_url
        else:
            _warn_memory_once(settings.broker_url)
            url = "memory://"
    if url.startswith("unix://"):
        url = "redis+" + url
    if not url.startswith(("redis", "valkey")):
        return url, {}
    return url, {"key_prefix": f"{settings.broker_key_prefix}ratelimit",
                 "socket_connect_timeout": _REDIS_TIMEOUT_SECONDS,
                 "socket_timeout": _REDIS_TIMEOUT_SECONDS}


def _warn_memory_once(broker_url: str) -> None:
    global _warned_memory  # noqa: PLW0603 - one warning per process, not per app
    if not _warned_memory:
        _warned_memory = True
        log.warning("Rate limits are counted in each API process's memory: the broker "
                    "(%s) is not Redis and RATE_LIMIT_STORAGE_URL is not set, so API "
                    "processes do not share their counts.", broker_url.partition(":")[0])


def check_limits(settings: Settings) -> None:
    """Refuse, at start, a limit the `limits` notation cannot read."""
    named = [("RATE_LIMIT_PER_KEY", settings.rate_limit_per_key),
             ("RATE_LIMIT_PER_COMPANY", settings.rate_limit_per_company)]
    named += [(f"RATE_LIMIT_COMPANY_OVERRIDES[{company}]", limit)
              for company, limit in settings.rate_limit_company_overrides.items()]
    for name, text in named:
        try:
            parse_many(text)
        except ValueError:
            raise ConfigError(f"{name}={text!r} is not a rate limit such as '600/minute' "
                              "or '10/second,500/hour'.") from None


def install(app, settings: Settings) -> Limiter | None:
    """The limiter over the app (None when limits are off).

    Install it before the gate: Flask runs before-request hooks in the order they were
    added, and the limiter's must count a request before the gate refuses its body."""
    if not settings.rate_limits_enabled:
        return None
    check_limits(settings)
    url, options = storage_of(settings)
    overrides = settings.rate_limit_company_overrides

    def company_limit() -> str:
        return overrides.get(_company_key(), settings.rate_limit_per_company)

    limiter = Limiter(
        _key_key,
        application_limits=[
            ApplicationLimit(settings.rate_limit_per_key, key_function=_key_key,
                             scope=KEY_SCOPE),
            ApplicationLimit(company_limit, key_function=_company_key, scope=COMPANY_SCOPE),
        ],
        storage_uri=url,
        storage_options=options,
        strategy=STRATEGY,
        # Our own headers (below): flask-limiter's would add Retry-After to every answer
        # and stretch an IDEMPOTENCY_IN_FLIGHT's short Retry-After to the window's end.
        headers_enabled=False,
        swallow_errors=True,
        in_memory_fallback_enabled=True,
    )
    limiter.request_filter(_not_limited)
    limiter.init_app(app)

    @app.after_request
    def _headers(response):
        return _add_headers(limiter, response)

    @app.errorhandler(RateLimitExceeded)
    def _rate_limited(exc: RateLimitExceeded):
        item = exc.limit.limit
        scope = exc.limit.scope if exc.limit.scope in (KEY_SCOPE, COMPANY_SCOPE) else KEY_SCOPE
        return envelope(f"Rate limit exceeded: {item}", "RATE_LIMITED", 429,
                        {"limit": str(item), "scope": scope})

    return limiter


def _not_limited() -> bool:
    """Whether this request counts against no budget: a public endpoint, no such route, or
    a caller the gate will refuse 401 (authenticated here first, which the gate reuses)."""
    if request.url_rule is None or request.blueprint in PUBLIC_BLUEPRINTS:
        return True
    try:
        current_principal()
    except Exception:
        # The gate meets the same error next and answers it; raised from here,
        # flask-limiter would take it for a storage failure.
        return True
    return False


def _key_key() -> str:
    principal = g.get("principal")
    key_id = getattr(principal, "api_key_id", None)
    return str(key_id) if key_id is not None else ""


def _company_key() -> str:
    principal = g.get("principal")
    company_id = getattr(principal, "company_id", None)
    return str(company_id).lower() if company_id is not None else ""


def _rate(limit: RequestLimit) -> float:
    """Requests per second the limit allows: the headers show the smallest, as configured
    (normally the key's). Reading every window to find the one nearest to running out
    would cost a storage round trip more per request."""
    return limit.limit.amount / limit.limit.get_expiry()


def _add_headers(limiter: Limiter, response):
    """RateLimit-* of the tightest budget (the one broken, on a 429); Retry-After on a 429."""
    try:
        current = limiter.current_limits
        if not current:
            return response
        breached = [limit for limit in current if limit.breached]
        shown = breached[0] if breached else min(current, key=_rate)
        reset_in = max(1, math.ceil(shown.window[0] - time.time()))
        response.headers[HEADER_LIMIT] = str(shown.limit.amount)
        response.headers[HEADER_REMAINING] = str(max(0, shown.remaining))
        response.headers[HEADER_RESET] = str(reset_in)
        if response.status_code == 429:
            response.headers["Retry-After"] = str(reset_in)
    except Exception:  # the storage failed between the check and now: no headers, no 500
        log.debug("rate limit headers left out", exc_info=True)
    return response
