"""Hostile request bodies on every JSON endpoint: a 4xx in the envelope, nothing written,
and the same answer from PostgreSQL and from the embedded SQLite default."""

from __future__ import annotations

import http.client
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
from sqlalchemy import func, select, update

from api import create_app
from api.gate import MAX_BODY_BYTES, MAX_DEPTH
from pipeline import ledger, tables
from tests.builders import auth, make_company, serving
from tests.conftest import _scratch_database, distributed_env, runtime_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

# Each JSON endpoint: who may call it, a valid body, and the path of one of its text fields.
ENDPOINTS = {
    "POST /v1/jobs": ("client", {"contentType": "text", "prompt": "hi", "settings": {}},
                      "prompt"),
    "POST /api/generate": ("client", {"contentType": "text", "prompt": "hi", "settings": {}},
                           "prompt"),
    "POST /functions/v1/media-start": ("client", {"jobType": "image",
                                                   "params": {"prompt": "hi"}}, "params.prompt"),
    "POST /v1/wallet/deposits": ("admin", {"amount": "5", "reference": "ref-1"}, "reference"),
    "POST /v1/wallet/refunds": ("admin", {"jobId": str(uuid.uuid4()), "amount": "1",
                                          "reference": "ref-1"}, "reference"),
    "PUT /v1/wallet/budgets": ("admin", {"period": "day", "cap": "10"}, "period"),
    "PUT /v1/provider-keys/openai": ("admin", {"apiKey": "sk-test-1234567890"}, "apiKey"),
}
# The tables a request could write to: each is counted before and after.
WRITABLE = (tables.jobs, tables.job_dispatches, tables.transactions, tables.credit_holds,
            tables.budgets, tables.provider_keys, tables.idempotency_keys, tables.wallets)


@dataclass(frozen=True)
class Case:
    name: str
    endpoint: str
    body: bytes
    status: int
    field: str | None = None
    content_type: str = "application/json"


def _json(value) -> str:
    """Our own tiny encoder, so raw literals (a 5,000-digit number, NaN) pass through."""
    import json

    return value.raw if isinstance(value, Raw) else json.dumps(value)


class Raw:
    def __init__(self, raw: str):
        self.raw = raw


def _encode(value) -> str:
    if isinstance(value, dict):
        return "{" + ",".join(f"{_json(k)}:{_encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_encode(v) for v in value) + "]"
    return _json(value)


def _with(body: dict, path: str, value) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in body.items()}
    *parents, leaf = path.split(".")
    target = out
    for part in parents:
        target = target[part]
    target[leaf] = value
    return out


def _cases() -> list[Case]:
    cases = []
    deep = Raw("[" * 1000 + "]" * 1000)
    too_deep = Raw("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))
    for endpoint, (_scope, body, field) in ENDPOINTS.items():
        def case(name, value, status=400, field_=field, *, raw=None, content_type=None,
                 endpoint=endpoint, body=body, field=field):
            data = raw if raw is not None else _encode(_with(body, field, value)).encode()
            cases.append(Case(f"{endpoint} {name}", endpoint, data, status, field_,
                              content_type or "application/json"))

        case("nested 1,000 deep", deep, field_=None)
        case(f"nested {MAX_DEPTH + 1} deep", too_deep, field_=None)
        case("lone surrogate", "a\ud800b")
        case("NUL", "a\x00b")
        case("5,000-digit integer", Raw("1" * 5000))
        case("64-bit overflow", Raw(str(2**63)))
        case("NaN", Raw("NaN"))
        case("Infinity", Raw("-Infinity"))
        case("1e400", Raw("1e400"))
        case("NUL in a key", None, field_="a?", raw=_encode({**body, "a\x00": 1}).encode())
        case("surrogate in a key", None, field_="?",
             raw=_encode({**body, "\udc00": 1}).encode())
        case("invalid UTF-8", None, field_=None, raw=b'{"prompt": "\xff\xfe"}')
        case("not JSON", None, field_=None, raw=b'{"prompt": ')
        case("not an object", None, field_=None, raw=b'["a"]')
        case("too large", None, 413, field_=None,
             raw=_encode(_with(body, field, "x" * (MAX_BODY_BYTES + 10))).encode())
        case("form-encoded", None, 415, field_=None, raw=b"prompt=hi",
             content_type="application/x-www-form-urlencoded")

    for endpoint, provider_field in (("POST /v1/jobs", "providerName"),
                                     ("POST /api/generate", "providerName"),
                                     ("POST /functions/v1/media-start", "provider")):
        _scope, body, _field = ENDPOINTS[endpoint]
        for label, value in (("array", ["local"]), ("object", {"name": "local"}), ("number", 7)):
            cases.append(Case(f"{endpoint} provider as {label}", endpoint,
                              _encode({**body, provider_field: value}).encode(), 400))
        cases.append(Case(f"{endpoint} unknown field", endpoint,
                          _encode({**body, "colour": "red"}).encode(), 400, "colour"))
    for endpoint in ("POST /v1/jobs", "POST /api/generate"):
        _scope, body, _field = ENDPOINTS[endpoint]
        for label, settings in (("NUL settings key", {"a\x00": 1}),
                                ("NUL settings value", {"style": "a\x00"}),
                                ("surrogate settings value", {"style": "\ud83d"})):
            cases.append(Case(f"{endpoint} {label}", endpoint,
                              _encode({**body, "settings": settings}).encode(), 400))
        cases.append(Case(f"{endpoint} invisible prompt", endpoint,
                          _encode({**body, "prompt": "\u200b\ufeff \u2060"}).encode(), 400,
                          "prompt"))
    for endpoint, field in (("POST /v1/wallet/deposits", "amount"),
                            ("POST /v1/wallet/refunds", "amount"),
                            ("PUT /v1/wallet/budgets", "cap")):
        _scope, body, _field = ENDPOINTS[endpoint]
        for literal in ("99999999999999", "1e15", "6.4e16", '"1e15"', '"NaN"', "-1"):
            cases.append(Case(f"{endpoint} {field} {literal}", endpoint,
                              _encode({**body, field: Raw(literal)}).encode(), 400))
    return cases


CASES = _cases()


class Backend:
    """One API (Flask's test client) over one database, with a funded company."""

    def __init__(self, env: dict):
        self.runtime = runtime_for(env)
        self.client = create_app(self.runtime).test_client()
        self.company = make_company(self.runtime.engine, credits=100)

    def call(self, endpoint: str, body: bytes, *, key: str | None,
             content_type: str = "application/json"):
        method, path = endpoint.split(" ", 1)
        headers = {"Content-Type": content_type, **(auth(key) if key else {})}
        return self.client.open(path, method=method, data=body, headers=headers)

    def key(self, scope: str) -> str:
        return self.company.admin_key if scope == "admin" else self.company.api_key

    def counts(self) -> dict[str, int]:
        with self.runtime.engine.connect() as conn:
            return {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one()
                    for t in WRITABLE}


@pytest.fixture(scope="module")
def backends(module_redis_prefix, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    with _scratch_database("hostile") as pg_url:
        pg = Backend(distributed_env(tmp / "pg", pg_url, module_redis_prefix,
                                     storage_url=f"file://{tmp}/pg-store"))
        embedded = Backend({"PIPELINE_DATA_DIR": str(tmp / "embedded"),
                            "PIPELINE_ENV_FILE": str(tmp / "no.env")})
        yield {"postgresql": pg, "sqlite": embedded}
        for backend in (pg, embedded):
            backend.runtime.engine.dispose()


def _envelope(resp) -> dict:
    body = resp.get_json()
    assert isinstance(body, dict), resp.get_data(as_text=True)[:300]
    assert set(body) == {"error", "code", "details"}, body
    return body


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_hostile_body_is_refused_with_nothing_written(backends, case):
    answers = {}
    for name, backend in backends.items():
        before = backend.counts()
        scope = ENDPOINTS[case.endpoint][0]
        resp = backend.call(case.endpoint, case.body, key=backend.key(scope),
                            content_type=case.content_type)
        body = _envelope(resp)
        assert resp.status_code == case.status, (name, body)
        if case.field is not None:
            assert body["details"].get("field") == case.field, (name, body)
        assert backend.counts() == before, name
        answers[name] = (resp.status_code, body["code"], body["details"].get("field"))
    assert answers["postgresql"] == answers["sqlite"]


@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_no_key_is_401_before_the_body_is_looked_at(backends, endpoint):
    for backend in backends.values():
        resp = backend.call(endpoint, b"[" * 5000, key=None)
        assert resp.status_code == 401
        assert _envelope(resp)["code"] == "UNAUTHORIZED"
        resp = backend.call(endpoint, b"{}", key="cp_not-a-key")
        assert resp.status_code == 401


@pytest.mark.parametrize("endpoint", [e for e, (scope, *_rest) in ENDPOINTS.items()
                                      if scope == "admin"])
def test_a_client_key_on_an_admin_endpoint_is_403_before_validation(backends, endpoint):
    for backend in backends.values():
        resp = backend.call(endpoint, b'{"amount": "x"}', key=backend.company.api_key)
        assert resp.status_code == 403
        assert _envelope(resp)["code"] == "FORBIDDEN"


def test_a_deposit_that_would_overflow_the_wallet_is_refused(backends):
    for backend in backends.values():
        engine, company = backend.runtime.engine, backend.company
        with engine.begin() as conn:
            # Ten credits short of the most a wallet may hold, all told.
            wallet = ledger.wallet_for_company(conn, company.company_id)
            conn.execute(update(tables.wallets).where(tables.wallets.c.id == wallet.id).values(
                credits_used=ledger.MAX_BALANCE - 10 - wallet.credits_available
                - wallet.credits_held))
        before = backend.counts()
        resp = backend.call("POST /v1/wallet/deposits",
                            b'{"amount": "100", "reference": "too-much"}', key=company.admin_key)
        body = _envelope(resp)
        assert resp.status_code == 400
        assert body["details"]["field"] == "amount"
        assert backend.counts() == before
        resp = backend.call("POST /v1/wallet/deposits",
                            b'{"amount": "5", "reference": "fits"}', key=company.admin_key)
        assert resp.status_code == 201, resp.get_json()


def test_a_budget_for_another_companys_user_is_refused(backends):
    for backend in backends.values():
        other = make_company(backend.runtime.engine)
        before = backend.counts()
        for scope, subject in (("user", other.user_id), ("user", uuid.uuid4())):
            resp = backend.call("PUT /v1/wallet/budgets", _encode(
                {"period": "day", "cap": "10", "scope": scope, "subject": str(subject)}
            ).encode(), key=backend.company.admin_key)
            assert resp.status_code == 400
            assert _envelope(resp)["details"]["field"] == "subject"
        assert backend.counts() == before
        resp = backend.call("PUT /v1/wallet/budgets", _encode(
            {"period": "day", "cap": "10", "scope": "user",
             "subject": str(backend.company.user_id)}).encode(),
            key=backend.company.admin_key)
        assert resp.status_code == 200, resp.get_json()


def test_seed_generate_checks_user_and_company_against_the_key(backends):
    for backend in backends.values():
        other = make_company(backend.runtime.engine)
        company = backend.company
        base = {"contentType": "text", "prompt": "hi", "providerName": "local"}
        for extra in ({"userId": str(other.user_id)}, {"companyId": str(other.company_id)},
                      {"userId": "not-a-user"}):
            resp = backend.call("POST /api/generate", _encode({**base, **extra}).encode(),
                                key=company.api_key)
            assert resp.status_code == 403, (extra, resp.get_json())
            # The admin key has no user of its own: the user must still be the company's.
            resp = backend.call("POST /api/generate", _encode({**base, **extra}).encode(),
                                key=company.admin_key)
            assert resp.status_code == 403, (extra, resp.get_json())
        resp = backend.call("POST /api/generate", _encode(
            {**base, "userId": str(company.user_id), "companyId": str(company.company_id)}
        ).encode(), key=company.api_key)
        assert resp.status_code == 202, resp.get_json()


def test_a_chunked_body_past_the_limit_is_413(backends):
    """Through a real HTTP server: no Content-Length, the body streamed in chunks."""
    backend = backends["postgresql"]
    with serving(create_app(backend.runtime)) as url:
        conn = http.client.HTTPConnection(urlsplit(url).netloc, timeout=30)
        chunk = b"x" * 65536
        body = iter([b'{"contentType": "text", "prompt": "'] + [chunk] * 20 + [b'"}'])
        conn.request("POST", "/v1/jobs", body=body, encode_chunked=True, headers={
            "Content-Type": "application/json", **auth(backend.company.api_key)})
        resp = conn.getresponse()
        assert resp.status == 413
        assert b"PAYLOAD_TOO_LARGE" in resp.read()
