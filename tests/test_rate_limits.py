"""Rate limits per API key and per company (api/limits.py): real Redis, real PostgreSQL."""

from __future__ import annotations

import threading
import time
import uuid

import pytest
import redis

from api import create_app
from api.limits import storage_of
from pipeline.accounts import create_api_key
from pipeline.config import ConfigError, Settings, company_overrides
from pipeline.db import init_db
from service.runtime import build_runtime
from service.stack import free_port
from tests.builders import auth, make_company
from tests.conftest import REDIS_URL
from tests.fakes.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

WALLET = "/v1/wallet"


def _spend(client, key: str, times: int) -> list[int]:
    return [client.get(WALLET, headers=auth(key)).status_code for _ in range(times)]


def _assert_rate_limited(response, limit: str, scope: str) -> None:
    assert response.status_code == 429
    assert response.json == {"error": f"Rate limit exceeded: {limit}", "code": "RATE_LIMITED",
                             "details": {"limit": limit, "scope": scope}}
    assert 1 <= int(response.headers["Retry-After"]) <= 60
    assert response.headers["RateLimit-Remaining"] == "0"
    assert 1 <= int(response.headers["RateLimit-Reset"]) <= 60


def test_the_key_past_its_limit_is_429_while_others_pass(api_stack):
    _env, runtime, client, company = api_stack(5, RATE_LIMIT_PER_KEY="5/minute",
                                              RATE_LIMIT_PER_COMPANY="8/minute")
    first = client.get(WALLET, headers=auth(company.api_key))
    assert first.status_code == 200
    assert first.headers["RateLimit-Limit"] == "5"
    assert first.headers["RateLimit-Remaining"] == "4"
    assert "Retry-After" not in first.headers
    assert _spend(client, company.api_key, 4) == [200] * 4
    refused = client.get(WALLET, headers=auth(company.api_key))
    _assert_rate_limited(refused, "5 per 1 minute", "key")
    documented = client.get("/openapi.json").get_json()["paths"][WALLET]["get"]["responses"]
    assert set(documented["429"]["headers"]) <= set(refused.headers.keys())

    # Another key of the company has its own budget, until the company's (8) runs out:
    # the first key's 5 (its refused request is not counted for the company) and 3 more.
    second_key = create_api_key(runtime.engine, company.company_id)
    assert _spend(client, second_key, 3) == [200] * 3
    _assert_rate_limited(client.get(WALLET, headers=auth(second_key)),
                         "8 per 1 minute", "company")

    other = make_company(runtime.engine, credits=5, name="other")
    assert _spend(client, other.api_key, 5) == [200] * 5

    # Public endpoints are never limited, and a refused key is not counted against anyone.
    assert {client.get("/healthz").status_code for _ in range(10)} == {200}
    assert client.get("/openapi.json").status_code == 200
    assert "RateLimit-Limit" not in client.get("/healthz").headers
    unauthenticated = [client.get(WALLET).status_code for _ in range(10)]
    unauthenticated += [client.get(WALLET, headers=auth("nope")).status_code
                        for _ in range(10)]
    assert set(unauthenticated) == {401}
    fresh = make_company(runtime.engine, credits=5, name="fresh")
    assert _spend(client, fresh.api_key, 5) == [200] * 5


def test_a_company_override_replaces_the_company_limit(api_stack):
    env, runtime, _client, company = api_stack(5, RATE_LIMIT_PER_KEY="50/minute")
    small = make_company(runtime.engine, credits=5, name="small")
    env2 = {**env, "RATE_LIMIT_COMPANY_OVERRIDES": f"{small.company_id}=2/minute"}
    runtime2 = build_runtime(Settings.from_env(environ=env2))
    try:
        client2 = create_app(runtime2).test_client()
        assert _spend(client2, small.api_key, 2) == [200, 200]
        _assert_rate_limited(client2.get(WALLET, headers=auth(small.api_key)),
                             "2 per 1 minute", "company")
        assert _spend(client2, company.api_key, 5) == [200] * 5
    finally:
        runtime2.engine.dispose()


def test_two_api_processes_share_the_counts_in_redis(api_stack):
    _env, runtime, client, company = api_stack(5, RATE_LIMIT_PER_KEY="6/minute")
    other_process = create_app(runtime).test_client()
    assert _spend(client, company.api_key, 3) == [200] * 3
    assert _spend(other_process, company.api_key, 3) == [200] * 3
    assert client.get(WALLET, headers=auth(company.api_key)).status_code == 429
    assert other_process.get(WALLET, headers=auth(company.api_key)).status_code == 429


def test_an_unreachable_limiter_storage_never_fails_a_request(api_stack):
    closed = f"redis://127.0.0.1:{free_port()}/0"
    _env, _runtime, client, company = api_stack(5, RATE_LIMIT_STORAGE_URL=closed,
                                                RATE_LIMIT_PER_KEY="100/minute")
    assert _spend(client, company.api_key, 5) == [200] * 5


def test_a_storage_outage_counts_in_memory_until_redis_answers_again(api_stack):
    """Redis behind a proxy that goes silent: the requests meanwhile are served and
    counted in the process's memory; after the back-off the shared count is used again."""
    with TcpProxy(("127.0.0.1", 6379)) as proxy:
        proxy.forward()
        _env, _runtime, client, company = api_stack(
            5, RATE_LIMIT_STORAGE_URL=f"redis://127.0.0.1:{proxy.port}/0",
            RATE_LIMIT_PER_KEY="4/minute")
        assert _spend(client, company.api_key, 3) == [200] * 3  # 1 left in Redis
        proxy.hold()
        during = client.get(WALLET, headers=auth(company.api_key))
        assert during.status_code == 200
        assert during.headers["RateLimit-Remaining"] == "3"  # a fresh count, in memory
        proxy.forward()
        time.sleep(1.2)  # the first back-off is 1 s
        # Redis has the 3 from before (and maybe the held request's, relayed late): its
        # count, not memory's 1 more, decides now.
        statuses = _spend(client, company.api_key, 2)
        assert statuses[-1] == 429, statuses


def test_the_embedded_mode_limits_in_memory(tmp_path):
    settings = Settings.from_env(environ={
        "PIPELINE_DATA_DIR": str(tmp_path / "var"), "PIPELINE_ENV_FILE": str(tmp_path / "no.env"),
        "RATE_LIMIT_PER_KEY": "3/minute"})
    runtime = build_runtime(settings)
    try:
        init_db(runtime.engine)
        company = make_company(runtime.engine, credits=5)
        client = create_app(runtime).test_client()
        # A body the gate refuses still counts: the check comes right after the key's.
        refused = client.post("/v1/jobs", data="{", headers={
            **auth(company.api_key), "Content-Type": "application/json"})
        assert refused.status_code == 400
        assert refused.headers["RateLimit-Remaining"] == "2"
        assert _spend(client, company.api_key, 2) == [200] * 2
        _assert_rate_limited(client.get(WALLET, headers=auth(company.api_key)),
                             "3 per 1 minute", "key")
    finally:
        runtime.engine.dispose()


def test_limits_can_be_turned_off_and_a_bad_limit_refuses_to_start(api_stack):
    env, _runtime, _client, company = api_stack(5)
    off = build_runtime(Settings.from_env(environ={**env, "RATE_LIMITS_ENABLED": "0",
                                                   "RATE_LIMIT_PER_KEY": "1/minute"}))
    try:
        assert _spend(create_app(off).test_client(), company.api_key, 3) == [200] * 3
    finally:
        off.engine.dispose()
    bad = build_runtime(Settings.from_env(environ={**env, "RATE_LIMIT_PER_KEY": "lots"}))
    try:
        with pytest.raises(ConfigError, match="RATE_LIMIT_PER_KEY"):
            create_app(bad)
    finally:
        bad.engine.dispose()


@pytest.mark.parametrize(("env", "url", "prefix"), [
    ({}, "memory://", None),
    ({"DATABASE_URL": "postgresql://db/x", "CELERY_BROKER_URL": "redis://r:6379/1",
      "CELERY_BROKER_KEY_PREFIX": "acme:"}, "redis://r:6379/1", "acme:ratelimit"),
    ({"DATABASE_URL": "postgresql://db/x", "CELERY_BROKER_URL": "amqp://mq//"},
     "memory://", None),
    ({"DATABASE_URL": "postgresql://db/x", "CELERY_BROKER_URL": "amqp://mq//",
      "RATE_LIMIT_STORAGE_URL": "redis://other:6379/2"}, "redis://other:6379/2", "ratelimit"),
])
def test_the_storage_follows_the_mode(tmp_path, env, url, prefix):
    settings = Settings.from_env(environ={
        "PIPELINE_DATA_DIR": str(tmp_path), "PIPELINE_ENV_FILE": str(tmp_path / "no.env"),
        "SECRET_KEY": "k", "PROVIDER_KEY_SECRETS": "dGVzdC1rZXktZm9yLXByb3ZpZGVyLWtleXMtMzJieXQ=",
        **env})
    got_url, options = storage_of(settings)
    assert got_url == url
    assert options.get("key_prefix") == prefix


def test_a_malformed_override_is_refused():
    assert company_overrides(" A=1/second ; b=2/minute,10/hour;") == {
        "a": "1/second", "b": "2/minute,10/hour"}
    with pytest.raises(ConfigError, match="RATE_LIMIT_COMPANY_OVERRIDES"):
        company_overrides("just-a-company")


class _Monitor:
    """The Redis commands that name `needle`, as MONITOR sees them (other tests share the
    server; their keys have other prefixes). Stops at an ECHO of its own marker."""

    def __init__(self, needle: str):
        self.needle, self.marker, self.seen = needle, f"end-{uuid.uuid4().hex}", []
        self.client = redis.Redis.from_url(REDIS_URL)
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        with self.client.monitor() as monitor:
            self.ready.set()
            for event in monitor.listen():
                command = event["command"]
                if self.marker in command:
                    return
                if self.needle in command and event["client_type"] != "lua":
                    self.seen.append(command.split(" ", 1)[0])  # a round trip, not a
                    # command a Lua script ran inside the server

    def __enter__(self):
        self.thread.start()
        self.ready.wait(5)
        time.sleep(0.2)  # MONITOR answers OK before the server starts streaming to it
        return self

    def __exit__(self, *exc):
        self.client.echo(self.marker)
        self.thread.join(10)
        self.client.close()


def test_an_authenticated_request_costs_three_redis_round_trips(api_stack):
    """One Lua call per budget (key, company) and one window read for the headers."""
    env, _runtime, client, company = api_stack(5)
    assert client.get(WALLET, headers=auth(company.api_key)).status_code == 200  # scripts loaded
    with _Monitor(env["CELERY_BROKER_KEY_PREFIX"]) as seen:
        for _ in range(5):
            assert client.get(WALLET, headers=auth(company.api_key)).status_code == 200
    assert len(seen.seen) == 5 * 3, seen.seen
    assert set(seen.seen) == {"EVALSHA"}
    off = build_runtime(Settings.from_env(environ={**env, "RATE_LIMITS_ENABLED": "0"}))
    try:
        off_client = create_app(off).test_client()
        with _Monitor(env["CELERY_BROKER_KEY_PREFIX"]) as seen:
            assert off_client.get(WALLET, headers=auth(company.api_key)).status_code == 200
        assert seen.seen == []
    finally:
        off.engine.dispose()
