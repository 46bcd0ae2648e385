"""Rate limits per API key and per company (the `limits` library's sliding-window
counter), answered 429 in the envelope.

Every authenticated request counts once against its key's budget (RATE_LIMIT_PER_KEY)
and once against its company's, shared by all the company's keys (RATE_LIMIT_PER_COMPANY,
or the company's entry in RATE_LIMIT_COMPANY_OVERRIDES). The check is a before-request
hook that runs ahead of the gate (api/gate.py): it authenticates the caller first, so a
request without a valid key is left to the gate's 401 and counts against nobody, while
one with a key counts even when the gate then refuses its scope (403) or its body (400,
413, 415). The public blueprints (health, metrics, docs, signed file links) are never
limited.

The hooks call `limits` straight, not through flask-limiter: its per-request bookkeeping
(the limits resolved, filtered and wrapped for every request) cost 0.7-0.8 ms more API
CPU per request than this, more than the three storage round trips themselves (README,
Rate limits).

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
import threading
import time

from flask import g, request
from limits import parse_many
from limits.storage import MemoryStorage, storage_from_string
from limits.strategies import SlidingWindowCounterRateLimiter

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
_MAX_BACKOFF_SECONDS = 64
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


def install(app, settings: Settings) -> RateLimiter | None:
    """The limiter over the app (None when limits are off).

    Install it before the gate: Flask runs before-request hooks in the order they were
    added, and the limiter's must count a request before the gate refuses its body."""
    if not settings.rate_limits_enabled:
        return None
    check_limits(settings)
    limiter = RateLimiter(settings)
    app.before_request(limiter.check)
    app.after_request(limiter.add_headers)
    return limiter


class RateLimiter:
    """Counts each authenticated request against its key's budget, then its company's.

    A request refused for its key's budget is not counted against its company's. When
    the storage fails, the process counts in its own memory and tries the storage again
    after a back-off (1, 2, 4 ... 64 s), so a storage outage never fails a request."""

    def __init__(self, settings: Settings):
        url, options = storage_of(settings)
        self._shared = SlidingWindowCounterRateLimiter(storage_from_string(url, **options))
        self._memory = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._per_key = parse_many(settings.rate_limit_per_key)
        self._per_company = parse_many(settings.rate_limit_per_company)
        self._overrides = {company: parse_many(limit) for company, limit
                           in settings.rate_limit_company_overrides.items()}
        self._lock = threading.Lock()
        self._failures = 0
        self._retry_at = 0.0  # while in the future, count in memory

    def check(self):
        """Before the gate: count the request; the 429 envelope when a budget ran out."""
        if _not_limited():
            return None
        principal = g.principal
        company = str(principal.company_id).lower()
        budgets = ((KEY_SCOPE, str(principal.api_key_id), self._per_key),
                   (COMPANY_SCOPE, company, self._overrides.get(company, self._per_company)))
        counter = self._counter()
        try:
            refused = _hit(counter, budgets)
        except Exception:
            self._storage_failed()
            counter = self._memory
            refused = _hit(counter, budgets)
        else:
            if self._failures and counter is self._shared:
                self._failures = 0  # it answers again: the next outage backs off from 1 s
                log.warning("The rate limit storage answers again; counting there.")
        if refused is None:
            g.rate_limit = (counter, _tightest(budgets))
            return None
        g.rate_limit = (counter, refused)
        item, scope, _who = refused
        return envelope(f"Rate limit exceeded: {item}", "RATE_LIMITED", 429,
                        {"limit": str(item), "scope": scope})

    def add_headers(self, response):
        """RateLimit-* of the budget shown (the one that ran out, on a 429); Retry-After
        on a 429. A storage that fails here leaves the headers out, never the answer."""
        counted = g.pop("rate_limit", None)
        if counted is None:
            return response
        counter, (item, scope, who) = counted
        try:
            stats = counter.get_window_stats(item, scope, who)
        except Exception:
            log.debug("rate limit headers left out", exc_info=True)
            return response
        reset_in = max(1, math.ceil(stats.reset_time - time.time()))
        response.headers[HEADER_LIMIT] = str(item.amount)
        response.headers[HEADER_REMAINING] = str(max(0, stats.remaining))
        response.headers[HEADER_RESET] = str(reset_in)
        if response.status_code == 429:
            response.headers["Retry-After"] = str(reset_in)
        return response

    def _counter(self) -> SlidingWindowCounterRateLimiter:
        if self._failures and time.monotonic() < self._retry_at:
            return self._memory
        return self._shared

    def _storage_failed(self) -> None:
        with self._lock:
            self._failures += 1
            wait = min(2 ** (self._failures - 1), _MAX_BACKOFF_SECONDS)
            self._retry_at = time.monotonic() + wait
        log.warning("The rate limit storage failed; counting in this process's memory "
                    "for %ss", wait, exc_info=log.isEnabledFor(logging.DEBUG))


def _hit(counter, budgets) -> tuple | None:
    """Count the request against each budget in turn: the (item, scope, who) that ran
    out first, or None. A budget that runs out stops the count there."""
    for scope, who, items in budgets:
        for item in items:
            if not counter.hit(item, scope, who):
                return item, scope, who
    return None


def _tightest(budgets) -> tuple:
    """The limit with the fewest requests per second, as configured (normally the key's).
    Reading every window to find the one nearest to running out would cost a storage
    round trip more per request."""
    return min(((item, scope, who) for scope, who, items in budgets for item in items),
               key=lambda limit: limit[0].amount / limit[0].get_expiry())


def _not_limited() -> bool:
    """Whether this request counts against no budget: a public endpoint, no such route, or
    a caller the gate will refuse 401 (authenticated here first, which the gate reuses)."""
    if request.url_rule is None or request.blueprint in PUBLIC_BLUEPRINTS:
        return True
    try:
        current_principal()
    except Exception:
        # The gate meets the same error next and answers it.
        return True
    return False
