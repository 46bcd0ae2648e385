"""Settings, read once from the environment (and an optional .env) into one object."""

from __future__ import annotations

import base64
import os
import secrets
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

SAAS_PROVIDERS = ("openai", "stability", "elevenlabs", "runway", "heygen")


def _read_dotenv(path: Path) -> dict[str, str]:
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


def _kept_secret(data_dir: Path, name: str, given: str | None, make) -> str:
    """A secret from the environment, or (embedded mode) one made once beside the data."""
    if given:
        return given
    path = data_dir / name
    if path.is_file():
        return path.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    value = make()
    path.write_text(value)
    path.chmod(0o600)
    return value


def _fernet_key() -> str:
    return base64.urlsafe_b64encode(os.urandom(32)).decode()


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
    # How often an asynchronous provider's remote job is polled.
    poll_interval_seconds: float = 3.0
    provider_env: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def embedded(self) -> bool:
        return self.database_url.startswith("sqlite") or self.broker_url.startswith("filesystem")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        env = dict(os.environ if environ is None else environ)
        env = {**_read_dotenv(Path(env.get("PIPELINE_ENV_FILE", ".env"))), **env}
        data_dir = Path(env.get("PIPELINE_DATA_DIR", "var")).resolve()

        def number(name: str, default, kind=int):
            return kind(env[name]) if env.get(name) else default

        values = {
            "data_dir": data_dir,
            "database_url": env.get("DATABASE_URL") or f"sqlite:///{data_dir / 'pipeline.db'}",
            "broker_url": env.get("CELERY_BROKER_URL") or "filesystem://",
            "storage_url": env.get("STORAGE_URL") or f"file://{data_dir / 'storage'}",
            "secret_key": _kept_secret(data_dir, "secret_key", env.get("SECRET_KEY"),
                                       lambda: secrets.token_urlsafe(32)),
            "provider_key_secrets": tuple(
                k.strip()
                for k in _kept_secret(data_dir, "provider_key_secrets",
                                      env.get("PROVIDER_KEY_SECRETS"), _fernet_key).split(",")
                if k.strip()
            ),
            "public_url": env.get("PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/"),
            "broker_key_prefix": env.get("CELERY_BROKER_KEY_PREFIX", ""),
            "s3_endpoint_url": env.get("S3_ENDPOINT_URL") or None,
            "s3_region": env.get("AWS_DEFAULT_REGION", "us-east-1"),
            "max_prompt_length": number("MAX_PROMPT_LENGTH", 4000),
            "link_ttl_seconds": number("LINK_TTL_SECONDS", 3600),
            "hold_timeout_seconds": number("HOLD_TIMEOUT_SECONDS", 3600),
            "stale_after_seconds": number("STALE_AFTER_SECONDS", 60),
            "requeue_after_seconds": number("REQUEUE_AFTER_SECONDS", 600),
            "storage_retry_seconds": number("STORAGE_RETRY_SECONDS", 300),
            "dispatch_grace_seconds": number("DISPATCH_GRACE_SECONDS", 5),
            "sweep_interval_seconds": number("SWEEP_INTERVAL_SECONDS", 5.0, float),
            "audit_interval_seconds": number("AUDIT_INTERVAL_SECONDS", 300.0, float),
            "max_attempts": number("MAX_ATTEMPTS", 3),
            "publish_timeout_seconds": number("PUBLISH_TIMEOUT_SECONDS", 2.0, float),
            "poll_interval_seconds": number("POLL_INTERVAL_SECONDS", 3.0, float),
            "provider_env": {
                k: v
                for k, v in env.items()
                if k.endswith(("_API_KEY", "_BASE_URL", "_DEADLINE_SECONDS"))
                or k.startswith(("COMFY", "ROUTE_"))
            },
        }
        values.update(overrides)
        return cls(**values)


def credits(value) -> Decimal:
    """Credits are exact decimals with six places; floats never enter the ledger."""
    if isinstance(value, float):
        value = repr(value)
    return Decimal(value).quantize(Decimal("0.000001"))
