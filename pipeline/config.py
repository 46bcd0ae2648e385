"""Settings, read once from the environment (and an optional .env) into one object."""

from __future__ import annotations

import base64
import contextlib
import os
import secrets
import tempfile
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from sqlalchemy.engine import make_url

SAAS_PROVIDERS = ("openai", "stability", "elevenlabs", "runway", "heygen")
HOW_TO_MAKE_SECRETS = "pipeline secrets generate"


class ConfigError(Exception):
    """The settings cannot run this process; the message says what to set, and how."""


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; the real environment always wins over the file."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip()] = value.strip().strip("'\"")
    return values


def environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The process's environment over its .env file (PIPELINE_ENV_FILE names another)."""
    env = dict(os.environ if environ is None else environ)
    return {**read_dotenv(Path(env.get("PIPELINE_ENV_FILE") or ".env")), **env}


def data_dir_of(env: dict[str, str]) -> Path:
    return Path(env.get("PIPELINE_DATA_DIR") or "var").resolve()


def database_url_of(env: dict[str, str]) -> str:
    return env.get("DATABASE_URL") or f"sqlite:///{data_dir_of(env) / 'pipeline.db'}"


def sqlite_file(database_url: str) -> Path | None:
    """The file of a SQLite database; None for any other database, or one in memory."""
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database).resolve()


def new_secrets() -> dict[str, str]:
    """Fresh values for both secrets, as `pipeline secrets generate` prints them."""
    return {"SECRET_KEY": secrets.token_urlsafe(32),
            # A Fernet key: 32 random bytes, url-safe base64.
            "PROVIDER_KEY_SECRETS": base64.urlsafe_b64encode(os.urandom(32)).decode()}


def _secrets(env: dict[str, str], database_url: str, data_dir: Path) -> dict:
    """SECRET_KEY and PROVIDER_KEY_SECRETS: from the environment, or made once (embedded).

    Every process that uses one database must hold the same two secrets:
    PROVIDER_KEY_SECRETS decrypts the company provider keys stored in it, and SECRET_KEY
    checks the file links any API process signed. So the rule follows the database, not
    the broker or the storage. A SQLite database is a file on one machine, read by
    processes that share its data folder: there (the embedded mode) a missing secret is
    made once into that folder and every process reads the same file. Any other database
    can be reached from many hosts, where a secret made per host would silently split the
    system (a key encrypted by the API that no worker can decrypt, links that break
    between API hosts), so there both must come from the environment, and a process
    without them refuses to start.
    """
    given = {name: env.get(name, "").strip() for name in new_secrets()}
    missing = [name for name, value in given.items() if not value]
    backend = make_url(database_url).get_backend_name()
    if missing and backend != "sqlite":
        raise ConfigError(
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set. Outside "
            f"the embedded SQLite mode (the database here is {backend}) every API process and "
            "worker must hold the same SECRET_KEY and PROVIDER_KEY_SECRETS, or company provider "
            "keys encrypted by one process cannot be decrypted by another and file links "
            "signed by one API host are refused by the next, so none is made up per host. "
            f"Make them once with `{HOW_TO_MAKE_SECRETS}` (it prints SECRET_KEY=... and "
            "PROVIDER_KEY_SECRETS=... lines for a .env file) and give the same values to "
            "every process.")
    fresh = new_secrets()
    values = {name: given[name] or _kept_secret(data_dir, name.lower(), fresh[name])
              for name in given}
    fernet_keys = tuple(k.strip() for k in values["PROVIDER_KEY_SECRETS"].split(",")
                        if k.strip())
    for number, key in enumerate(fernet_keys, 1):
        if not _is_fernet_key(key):
            raise ConfigError(
                f"PROVIDER_KEY_SECRETS entry {number} of {len(fernet_keys)} is not a Fernet "
                "key (32 bytes in url-safe base64). Make one with "
                f"`{HOW_TO_MAKE_SECRETS}`; to rotate, put the new key first, comma-separated.")
    return {"secret_key": values["SECRET_KEY"], "provider_key_secrets": fernet_keys}


def _is_fernet_key(key: str) -> bool:
    from cryptography.fernet import Fernet

    try:
        Fernet(key)
    except ValueError:  # binascii.Error is one too
        return False
    return True


def _kept_secret(data_dir: Path, name: str, candidate: str) -> str:
    """The secret kept in `data_dir/name`; `candidate` becomes it if there is none yet.

    Processes starting together (gunicorn's workers, the worker beside the API) race
    here. Each writes its candidate whole into a private temporary file (0600) and
    hard-links it to the name; a link never replaces an existing file, so the first
    writer wins, nobody ever reads a half-written file, and every process then reads
    the winner's value.
    """
    path = data_dir / name
    if not path.is_file():
        data_dir.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=data_dir, prefix=f".{name}.")
        try:
            with os.fdopen(fd, "w") as file:
                file.write(candidate)
            # FileExistsError: another process got there first, and its value is the one.
            with contextlib.suppress(FileExistsError):
                os.link(temp, path)
        finally:
            os.unlink(temp)
    return path.read_text().strip()


@dataclass(frozen=True)
class Settings:
    """Every knob of the system. Build with `Settings.from_env()`; tests pass overrides."""

    data_dir: Path
    database_url: str
    broker_url: str
    storage_url: str
    secret_key: str = field(repr=False)
    # Fernet keys for per-company provider keys, newest first: encrypt with the first,
    # decrypt with any, so keys rotate by prepending a new one (`pipeline keys rotate`).
    provider_key_secrets: tuple[str, ...] = field(default=(), repr=False)
    public_url: str = "http://127.0.0.1:8000"
    broker_key_prefix: str = ""
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    max_prompt_length: int = 4000
    link_ttl_seconds: int = 3600
    # A hold must outlive the longest a job can take: queue wait + provider time + retries.
    hold_timeout_seconds: int = 3600
    # The API takes a job's hold right after the submit commits (one statement), and the
    # job's chain is then generate -> finish; off, every job's chain starts with reserve.
    hold_at_submit: bool = True
    # How long a job may show no sign of life before the sweeper re-drives it. A live
    # worker renews the heartbeat every stale_after/5 seconds during provider calls,
    # uploads and GPU polls, so staleness means "the worker is gone", not "the call is slow".
    stale_after_seconds: int = 60
    # A job still queued (its chain published, no worker has taken it) this long is
    # published again, in case its message was lost. Longer than stale_after: under a
    # backlog, messages wait their turn, and each re-publish is a duplicate to skip.
    requeue_after_seconds: int = 600
    # How long a generate step keeps retrying an output it already has (paid for) into
    # storage, with backoff, before it gives up; the vendor is never asked again.
    storage_retry_seconds: int = 300
    # Jobs left pending longer than this are re-published by the sweeper (outbox relay).
    dispatch_grace_seconds: int = 5
    sweep_interval_seconds: float = 5.0
    audit_interval_seconds: float = 300.0
    max_attempts: int = 3
    publish_timeout_seconds: float = 2.0
    # How long a request's claim on an Idempotency-Key holds before a retry may take it
    # over (the claiming API process died): longer than a submission takes.
    idempotency_lease_seconds: float = 10.0
    # How often an asynchronous provider's remote job is polled.
    poll_interval_seconds: float = 3.0
    # A GPU prompt (ComfyUI: our own server) is checked this often when its websocket is
    # not connected; with it, its "prompt ended" message wakes the check at once.
    gpu_poll_seconds: float = 0.25
    # Prompts one ComfyUI instance holds at once: one running, the rest queued behind it so
    # the GPU never idles while a finished job downloads and stores (give the gpu worker
    # this many slots per instance). 1: never a prompt waiting behind another.
    comfyui_prompts_per_instance: int = 2
    # Logs: every process writes one line per record to stdout, JSON or text (LOG_FORMAT:
    # `pipeline run` defaults to text), at LOG_LEVEL and above.
    log_level: str = "info"
    log_format: str = "json"
    # Records at this level and above also become rows of the `logs` table ("off": none).
    log_table_level: str = "info"
    # Rows older than these many days are pruned by beat (0 keeps them forever), at most
    # prune_batch_size rows per statement so no delete holds its locks for long.
    logs_retention_days: int = 30
    metrics_retention_days: int = 90
    api_usage_retention_days: int = 400
    prune_interval_seconds: float = 3600.0
    prune_batch_size: int = 5000
    # Metrics (service/metrics.py): the Bearer token every metrics endpoint asks for
    # ("" = none: then only loopback callers are answered); each worker node's exporter,
    # served by its main process on this host and port (0 = off); the folder under which
    # each worker keeps its processes' metric files (default <data_dir>/metrics).
    metrics_token: str = field(default="", repr=False)
    worker_metrics_host: str = "127.0.0.1"
    worker_metrics_port: int = 0
    metrics_dir: Path | None = None
    # Celery task events (Flower's live view), TASK_EVENTS=1. Off by default: they cost
    # the workers about a sixth of their throughput (README, Flower); a running Flower
    # turns them on in the workers it watches anyway.
    task_events: bool = False
    # API rate limits (api/limits.py), in the `limits` notation ("600/minute", several
    # joined by commas): one budget per API key, one per company shared by its keys, and
    # per-company replacements for the latter (company id -> limit). The storage is
    # RATE_LIMIT_STORAGE_URL, else memory in the embedded mode, else the broker's Redis.
    rate_limits_enabled: bool = True
    rate_limit_per_key: str = "600/minute"
    rate_limit_per_company: str = "3000/minute"
    rate_limit_storage_url: str = field(default="", repr=False)
    rate_limit_company_overrides: dict[str, str] = field(default_factory=dict)
    # Live job events (SSE streams, `Prefer: wait`; service/announce.py): EVENTS_URL picks
    # how processes wake the API's listeners ("" = the broker's Redis, else PostgreSQL
    # LISTEN/NOTIFY, else a database poll every events_poll_seconds; or a redis:// URL,
    # "postgresql" or "poll"). A stream sends a comment every events_keepalive_seconds.
    events_url: str = field(default="", repr=False)
    events_keepalive_seconds: float = 15.0
    events_poll_seconds: float = 1.0
    # Webhooks (pipeline/webhooks.py). WEBHOOK_ALLOW_PRIVATE=1 lets webhooks reach
    # private, loopback and link-local addresses (an operator's own network; tests);
    # retries wait these many seconds in turn (WEBHOOK_RETRY_SCHEDULE, comma-separated:
    # 30 s, 2 m, 10 m, 1 h, 3 h, 6 h, 12 h, about 22 h in all), then the delivery fails;
    # each connect and read waits at most webhook_timeout_seconds; a rotated secret keeps
    # signing for webhook_secret_grace_seconds; beat relays due deliveries this often.
    webhook_allow_private: bool = False
    webhook_retry_schedule: tuple[float, ...] = (30, 120, 600, 3600, 10800, 21600, 43200)
    webhook_timeout_seconds: float = 10.0
    webhook_secret_grace_seconds: float = 86400.0
    webhook_relay_seconds: float = 2.0
    provider_env: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def embedded(self) -> bool:
        """Single-machine mode: a SQLite database or a filesystem broker (one shared disk).

        The secrets follow a narrower rule, the database's alone: see `_secrets`.
        """
        return self.database_url.startswith("sqlite") or self.broker_url.startswith("filesystem")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        """Raises ConfigError when the secrets are missing outside SQLite, or malformed."""
        env = environment(environ)
        data_dir = data_dir_of(env)

        def number(name: str, default, kind=int):
            return kind(env[name]) if env.get(name) else default

        values = {
            "data_dir": data_dir,
            "database_url": database_url_of(env),
            "broker_url": env.get("CELERY_BROKER_URL") or "filesystem://",
            "storage_url": env.get("STORAGE_URL") or f"file://{data_dir / 'storage'}",
            "public_url": (env.get("PUBLIC_URL") or "http://127.0.0.1:8000").rstrip("/"),
            "broker_key_prefix": env.get("CELERY_BROKER_KEY_PREFIX", ""),
            "s3_endpoint_url": env.get("S3_ENDPOINT_URL") or None,
            "s3_region": env.get("AWS_DEFAULT_REGION") or "us-east-1",
            "max_prompt_length": number("MAX_PROMPT_LENGTH", 4000),
            "link_ttl_seconds": number("LINK_TTL_SECONDS", 3600),
            "hold_timeout_seconds": number("HOLD_TIMEOUT_SECONDS", 3600),
            "hold_at_submit": env.get("HOLD_AT_SUBMIT", "").strip().lower()
            not in ("0", "false", "no", "off"),
            "stale_after_seconds": number("STALE_AFTER_SECONDS", 60),
            "requeue_after_seconds": number("REQUEUE_AFTER_SECONDS", 600),
            "storage_retry_seconds": number("STORAGE_RETRY_SECONDS", 300),
            "dispatch_grace_seconds": number("DISPATCH_GRACE_SECONDS", 5),
            "sweep_interval_seconds": number("SWEEP_INTERVAL_SECONDS", 5.0, float),
            "audit_interval_seconds": number("AUDIT_INTERVAL_SECONDS", 300.0, float),
            "max_attempts": number("MAX_ATTEMPTS", 3),
            "publish_timeout_seconds": number("PUBLISH_TIMEOUT_SECONDS", 2.0, float),
            "idempotency_lease_seconds": number("IDEMPOTENCY_LEASE_SECONDS", 10.0, float),
            "poll_interval_seconds": number("POLL_INTERVAL_SECONDS", 3.0, float),
            "gpu_poll_seconds": number("GPU_POLL_SECONDS", 0.25, float),
            "comfyui_prompts_per_instance": max(1, number("COMFYUI_PROMPTS_PER_INSTANCE", 2)),
            "log_level": _choice(env, "LOG_LEVEL", LOG_LEVELS, "info"),
            "log_format": _choice(env, "LOG_FORMAT", ("json", "text"), "json"),
            "log_table_level": _choice(env, "LOG_TABLE_LEVEL", (*LOG_LEVELS, "off"), "info"),
            "logs_retention_days": number("LOGS_RETENTION_DAYS", 30),
            "metrics_retention_days": number("METRICS_RETENTION_DAYS", 90),
            "api_usage_retention_days": number("API_USAGE_RETENTION_DAYS", 400),
            "prune_interval_seconds": number("PRUNE_INTERVAL_SECONDS", 3600.0, float),
            "prune_batch_size": number("PRUNE_BATCH_SIZE", 5000),
            "metrics_token": env.get("METRICS_TOKEN", "").strip(),
            "worker_metrics_host": env.get("WORKER_METRICS_HOST") or "127.0.0.1",
            "worker_metrics_port": number("WORKER_METRICS_PORT", 0),
            "metrics_dir": Path(env["METRICS_DIR"]).resolve() if env.get("METRICS_DIR")
            else data_dir / "metrics",
            "task_events": env.get("TASK_EVENTS", "").strip().lower() in ("1", "true", "yes"),
            "rate_limits_enabled": env.get("RATE_LIMITS_ENABLED", "").strip().lower()
            not in ("0", "false", "no", "off"),
            "rate_limit_per_key": env.get("RATE_LIMIT_PER_KEY", "").strip() or "600/minute",
            "rate_limit_per_company": env.get("RATE_LIMIT_PER_COMPANY", "").strip()
            or "3000/minute",
            "rate_limit_storage_url": env.get("RATE_LIMIT_STORAGE_URL", "").strip(),
            "rate_limit_company_overrides": company_overrides(
                env.get("RATE_LIMIT_COMPANY_OVERRIDES", "")),
            "events_url": env.get("EVENTS_URL", "").strip(),
            "events_keepalive_seconds": number("EVENTS_KEEPALIVE_SECONDS", 15.0, float),
            "events_poll_seconds": number("EVENTS_POLL_SECONDS", 1.0, float),
            "webhook_allow_private": env.get("WEBHOOK_ALLOW_PRIVATE", "").strip().lower()
            in ("1", "true", "yes"),
            "webhook_retry_schedule": retry_schedule(env.get("WEBHOOK_RETRY_SCHEDULE", "")),
            "webhook_timeout_seconds": number("WEBHOOK_TIMEOUT_SECONDS", 10.0, float),
            "webhook_secret_grace_seconds": number("WEBHOOK_SECRET_GRACE_SECONDS", 86400.0,
                                                   float),
            "webhook_relay_seconds": number("WEBHOOK_RELAY_SECONDS", 2.0, float),
            "provider_env": {
                k: v
                for k, v in env.items()
                if k.endswith(("_API_KEY", "_BASE_URL", "_DEADLINE_SECONDS"))
                or k.startswith(("COMFY", "ROUTE_"))
            },
        }
        values.update(overrides)
        if not {"secret_key", "provider_key_secrets"} <= overrides.keys():
            values = {**_secrets(env, values["database_url"], data_dir), **values}
        return cls(**values)


def company_overrides(text: str) -> dict[str, str]:
    """RATE_LIMIT_COMPANY_OVERRIDES: `<company id>=<limit>` entries separated by `;`.

    A company's limit may itself be several, comma-separated ("5/second,100/minute"); the
    API checks that each parses when it starts."""
    overrides: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(";"))):
        company, sep, limit = (piece.strip() for piece in entry.partition("="))
        if not sep or not company or not limit:
            raise ConfigError(
                f"RATE_LIMIT_COMPANY_OVERRIDES entry {entry!r} is not <company id>=<limit>, "
                "as in 5d7c...=100/minute;9a1b...=10/second,500/hour")
        overrides[company.lower()] = limit
    return overrides


def retry_schedule(text: str) -> tuple[float, ...]:
    """WEBHOOK_RETRY_SCHEDULE: seconds before each retry, comma-separated ("" = default)."""
    if not text.strip():
        return Settings.webhook_retry_schedule
    try:
        waits = tuple(float(part) for part in text.split(","))
    except ValueError:
        waits = ()
    if not waits or any(not 0 <= w < 10**7 for w in waits):
        raise ConfigError(f"WEBHOOK_RETRY_SCHEDULE {text!r} is not a comma-separated list of "
                          "seconds, as in 30,120,600,3600")
    return waits


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _choice(env: dict[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    value = (env.get(name) or default).strip().lower()
    if value == "warn":  # the seed's word for it
        value = "warning"
    if value not in allowed:
        raise ConfigError(f"{name}={env[name]!r} is not one of: {', '.join(allowed)}")
    return value


def credits(value) -> Decimal:
    """Credits are exact decimals with six places; floats never enter the ledger."""
    if isinstance(value, float):
        value = repr(value)
    return Decimal(value).quantize(Decimal("0.000001"))
