"""Idempotency-Key on POST /v1/jobs over real PostgreSQL and a real Redis broker."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from sqlalchemy import select, text

from api import create_app
from api.schemas import JobCreate
from pipeline import idempotency
from pipeline.tables import idempotency_keys
from tests.builders import auth, count_jobs, make_company, serving
from tests.conftest import distributed_env, runtime_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

KITE = {"contentType": "image", "prompt": "a red kite", "settings": {"width": 100, "height": 100}}


def _runtime(tmp, pg_database, redis_prefix, *, wrap=lambda publisher: publisher):
    env = distributed_env(tmp, pg_database, redis_prefix, storage_url=f"file://{tmp}/storage")
    return runtime_for(env, wrap=wrap)


@pytest.fixture(scope="module")
def runtime(pg_database, module_redis_prefix, tmp_path_factory):
    rt = _runtime(tmp_path_factory.mktemp("idem"), pg_database, module_redis_prefix)
    yield rt
    rt.engine.dispose()


@pytest.fixture
def client(runtime):
    return create_app(runtime).test_client()


@pytest.fixture
def company(runtime):
    return make_company(runtime.engine, credits=10)


def _post(client, company, key, payload=KITE, **kwargs):
    headers = {**auth(company.api_key), **kwargs.pop("headers", {})}
    if key is not None:
        headers[idempotency.HEADER] = key
    if "data" in kwargs:
        headers["Content-Type"] = "application/json"
        return client.post("/v1/jobs", headers=headers, **kwargs)
    return client.post("/v1/jobs", headers=headers, json=payload, **kwargs)


def _assert_envelope(resp, status: int, code: str) -> dict:
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"error", "code", "details"}
    assert body["code"] == code
    return body


def _key_row(engine, company_id, key):
    with engine.connect() as conn:
        return conn.execute(select(idempotency_keys).where(
            idempotency_keys.c.company_id == company_id, idempotency_keys.c.key == key)).first()


def _set_key(engine, company_id, key, assignments: str) -> None:
    with engine.begin() as conn:
        conn.execute(text(f"UPDATE idempotency_keys SET {assignments} "
                          "WHERE company_id = :c AND key = :k"), {"c": company_id, "k": key})


def test_same_key_and_body_replays_the_first_response(client, company, runtime):
    key = str(uuid.uuid4())
    first = _post(client, company, key)
    assert first.status_code == 202, first.get_json()
    assert "Idempotent-Replayed" not in first.headers

    second = _post(client, company, key)
    assert second.status_code == 202
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.get_json() == first.get_json()
    assert second.headers["Location"] == first.headers["Location"]
    assert count_jobs(runtime.engine, company.company_id) == 1
    assert _key_row(runtime.engine, company.company_id, key).status == "done"


def test_requests_without_a_key_are_not_deduplicated(client, company, runtime):
    ids = {_post(client, company, None).get_json()["jobId"] for _ in range(2)}
    assert len(ids) == 2
    assert count_jobs(runtime.engine, company.company_id) == 2


@pytest.mark.parametrize("raw", [
    '{"settings": {"height": 100, "width": 100}, "prompt": "a red kite", "contentType": "image"}',
    '{\n  "contentType" : "image",\n  "prompt" : "a red kite",\n'
    '  "settings" : { "width" : 100, "height" : 100 },\n  "providerName" : null\n}',
])
def test_key_order_whitespace_and_defaults_are_the_same_request(client, company, runtime, raw):
    key = str(uuid.uuid4())
    first = _post(client, company, key)
    again = _post(client, company, key, data=raw)
    assert again.status_code == 202, again.get_json()
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.get_json()["jobId"] == first.get_json()["jobId"]
    assert count_jobs(runtime.engine, company.company_id) == 1


def test_same_key_with_another_body_is_422_and_creates_nothing(client, company, runtime):
    key = str(uuid.uuid4())
    first = _post(client, company, key)
    other = _post(client, company, key, {**KITE, "prompt": "a blue kite"})
    body = _assert_envelope(other, 422, "IDEMPOTENCY_KEY_REUSED")
    assert body["details"] == {"header": "Idempotency-Key"}
    assert count_jobs(runtime.engine, company.company_id) == 1
    # The stored response is untouched: the original body still replays.
    assert _post(client, company, key).get_json() == first.get_json()


def test_keys_are_scoped_to_the_company(client, company, runtime):
    other = make_company(runtime.engine, credits=10, name="other")
    key = "order-42"
    mine = _post(client, company, key)
    theirs = _post(client, other, key)
    assert theirs.status_code == 202
    assert "Idempotent-Replayed" not in theirs.headers
    assert theirs.get_json()["jobId"] != mine.get_json()["jobId"]
    assert count_jobs(runtime.engine, company.company_id) == 1
    assert count_jobs(runtime.engine, other.company_id) == 1


@pytest.mark.parametrize(
    ("credits", "payload", "expected"),
    [
        ("0.001", {"contentType": "video", "prompt": "a long film", "settings": {"duration": 30}},
         (402, "INSUFFICIENT_CREDITS")),
        (10, {"contentType": "text", "prompt": "x", "provider": "nobody"},
         (400, "VALIDATION_ERROR")),
    ],
)
def test_errors_raised_by_the_submission_are_stored_and_replayed(client, runtime, credits,
                                                                 payload, expected):
    status, code = expected
    company = make_company(runtime.engine, credits=credits, name="refused")
    key = str(uuid.uuid4())
    first = _post(client, company, key, payload)
    body = _assert_envelope(first, status, code)
    replayed = _post(client, company, key, payload)
    assert _assert_envelope(replayed, status, code) == body
    assert replayed.headers["Idempotent-Replayed"] == "true"
    assert "Location" not in replayed.headers
    assert count_jobs(runtime.engine, company.company_id) == 0


def test_a_body_refused_by_the_schema_does_not_claim_the_key(client, company, runtime):
    key = str(uuid.uuid4())
    _assert_envelope(_post(client, company, key, {"contentType": "hologram", "prompt": "x"}),
                     400, "VALIDATION_ERROR")
    assert _key_row(runtime.engine, company.company_id, key) is None
    assert _post(client, company, key).status_code == 202


def test_a_server_error_gives_the_key_back(client, company, runtime, monkeypatch):
    key = str(uuid.uuid4())

    def broken(*_args, **_kwargs):
        raise RuntimeError("pricing exploded")

    with monkeypatch.context() as patch:
        patch.setattr(runtime.registry, "estimate_usage", broken)
        _assert_envelope(_post(client, company, key), 500, "INTERNAL_ERROR")
    assert _key_row(runtime.engine, company.company_id, key) is None

    retry = _post(client, company, key)
    assert retry.status_code == 202
    assert "Idempotent-Replayed" not in retry.headers
    assert count_jobs(runtime.engine, company.company_id) == 1


def test_an_expired_key_can_be_used_again(client, company, runtime):
    key = str(uuid.uuid4())
    first = _post(client, company, key)
    _set_key(runtime.engine, company.company_id, key, "expires_at = now() - interval '1 second'")

    fresh = _post(client, company, key, {**KITE, "prompt": "another kite"})
    assert fresh.status_code == 202, fresh.get_json()
    assert "Idempotent-Replayed" not in fresh.headers
    assert fresh.get_json()["jobId"] != first.get_json()["jobId"]
    assert count_jobs(runtime.engine, company.company_id) == 2
    # The key now belongs to the new request.
    assert _post(client, company, key, {**KITE, "prompt": "another kite"}).get_json() == \
        fresh.get_json()


def test_a_key_still_in_flight_is_409_with_the_seconds_left(client, company, runtime):
    key = str(uuid.uuid4())
    _post(client, company, key)
    # As if the first request were still running: claimed, no response stored yet.
    _set_key(runtime.engine, company.company_id, key,
             "status = 'in_flight', response_status = NULL, response_body = NULL, "
             "lease_token = 'other', lease_expires_at = now() + interval '5 seconds'")

    resp = _post(client, company, key)
    body = _assert_envelope(resp, 409, "IDEMPOTENCY_IN_FLIGHT")
    assert "still being processed" in body["error"]
    assert 1 <= int(resp.headers["Retry-After"]) <= 5
    assert body["details"]["retryAfterSeconds"] == int(resp.headers["Retry-After"])
    assert count_jobs(runtime.engine, company.company_id) == 1
    # Another body with the key is still a misuse, whatever the first request's state.
    _assert_envelope(_post(client, company, key, {**KITE, "prompt": "x"}), 422,
                     "IDEMPOTENCY_KEY_REUSED")


def test_a_lapsed_lease_is_taken_over_and_the_job_made_once(client, company, runtime):
    # The first request's process died after claiming the key and before its job's
    # commit: nothing was made, and the lease has run out.
    engine, cid, key = runtime.engine, company.company_id, str(uuid.uuid4())
    lost = idempotency.begin(engine, cid, key, idempotency.request_hash(
        {"endpoint": "POST /v1/jobs", "body": JobCreate().load(KITE)}),  # as the view parses it
        lease_seconds=0)
    assert isinstance(lost, idempotency.Claim)

    retry = _post(client, company, key)
    assert retry.status_code == 202, retry.get_json()
    assert "Idempotent-Replayed" not in retry.headers
    row = _key_row(engine, cid, key)
    assert row.status == "done"
    assert str(row.job_id) == retry.get_json()["jobId"]
    # Had the first request only been slow, its job's transaction now finds the claim
    # gone and rolls back: one key, one job.
    with pytest.raises(idempotency.LeaseLost), engine.begin() as conn:
        idempotency.complete(conn, lost, 202, {"jobId": "never"})
    assert _post(client, company, key).get_json() == retry.get_json()
    assert count_jobs(engine, cid) == 1


def test_an_error_after_the_jobs_commit_keeps_the_key_on_the_job(client, company, runtime,
                                                                  monkeypatch):
    key = str(uuid.uuid4())

    def broken(*_args, **_kwargs):
        raise RuntimeError("lost the broker and the database at once")

    with monkeypatch.context() as patch:
        patch.setattr("api.jobs.jobs_uc.dispatch", broken)
        _assert_envelope(_post(client, company, key), 500, "INTERNAL_ERROR")
    row = _key_row(runtime.engine, company.company_id, key)
    assert row.status == "done"
    assert row.job_id is not None

    retry = _post(client, company, key)
    assert retry.status_code == 202
    assert retry.headers["Idempotent-Replayed"] == "true"
    assert retry.get_json() == {"jobId": str(row.job_id), "status": "pending",
                                "estimatedCost": retry.get_json()["estimatedCost"]}
    assert count_jobs(runtime.engine, company.company_id) == 1


def test_the_stored_response_follows_the_publish(client, company, runtime):
    key = str(uuid.uuid4())
    first = _post(client, company, key)
    assert first.get_json()["status"] == "queued"
    # Stored as `pending` in the job's transaction, revised once the chain was published.
    assert _key_row(runtime.engine, company.company_id, key).response_body == first.get_json()


def test_claims_work_directly_for_the_same_hash_only(runtime, company):
    engine, cid = runtime.engine, company.company_id
    h = idempotency.request_hash({"b": 1, "a": [1, 2]})
    assert h == idempotency.request_hash({"a": [1, 2], "b": 1})
    claim = idempotency.begin(engine, cid, "k", h)
    with pytest.raises(idempotency.IdempotencyInFlight):
        idempotency.begin(engine, cid, "k", h)
    with pytest.raises(idempotency.IdempotencyKeyReused):
        idempotency.begin(engine, cid, "k", idempotency.request_hash({"b": 2}))
    idempotency.finish(engine, claim, 202, {"jobId": "j"})
    assert idempotency.begin(engine, cid, "k", h) == idempotency.Replay(202, {"jobId": "j"})
    idempotency.abandon(engine, claim)  # a done key is never given back
    assert idempotency.begin(engine, cid, "k", h) == idempotency.Replay(202, {"jobId": "j"})


@pytest.mark.parametrize("key", ["", "x" * 256, "caf\u00e9", "tab\there", "del\x7f"])
def test_a_malformed_key_is_400_naming_the_header(client, company, runtime, key):
    body = _assert_envelope(_post(client, company, key), 400, "VALIDATION_ERROR")
    assert "Idempotency-Key" in body["error"]
    assert body["details"]["header"] == "Idempotency-Key"
    assert count_jobs(runtime.engine, company.company_id) == 0


@pytest.mark.parametrize("key", ["k", "x" * 255, "order 42: ~!@#$%^&*()"])
def test_any_printable_ascii_key_up_to_255_characters_is_accepted(client, company, key):
    assert _post(client, company, key).status_code == 202
    assert _post(client, company, key).headers["Idempotent-Replayed"] == "true"


def test_purge_expired_deletes_expired_keys_in_batches(client, company, runtime):
    engine, cid = runtime.engine, company.company_id
    for key in ("old-1", "old-2", "old-3", "live"):
        idempotency.begin(engine, cid, key, idempotency.request_hash({"key": key}))
    for key in ("old-1", "old-2", "old-3"):
        _set_key(engine, cid, key, "expires_at = now() - interval '1 minute'")

    assert idempotency.purge_expired(engine, batch=2) == 2
    while idempotency.purge_expired(engine, batch=2):
        pass
    assert [k for k in ("old-1", "old-2", "old-3", "live")
            if _key_row(engine, cid, k) is not None] == ["live"]


def test_openapi_documents_the_header_and_its_errors(client):
    post = client.get("/openapi.json").get_json()["paths"]["/v1/jobs"]["post"]
    assert "Idempotency-Key" in {p["name"] for p in post["parameters"] if p["in"] == "header"}
    assert {"409", "422"} <= set(post["responses"])


class SlowQuote:
    """Holds the request that claimed the key inside its job's transaction (the quote runs
    there), so the concurrent retries find the key in flight. A hold after the commit
    (a slow publish) would not do: the key's answer is stored with the job, and a retry
    arriving then is answered with it."""

    def __init__(self, inner, delay: float):
        self.inner, self.delay = inner, delay

    def estimate_usage(self, *args, **kwargs):
        time.sleep(self.delay)
        return self.inner.estimate_usage(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def slow_server(pg_database, module_redis_prefix, tmp_path_factory):
    """The app on a real threaded HTTP server, its quote slowed to widen the race."""
    rt = _runtime(tmp_path_factory.mktemp("idem-http"), pg_database, module_redis_prefix)
    rt.registry = SlowQuote(rt.registry, delay=0.5)
    with serving(create_app(rt)) as url:
        yield rt, url
    rt.engine.dispose()


def test_concurrent_requests_with_one_key_create_one_job(slow_server):
    rt, base_url = slow_server
    company = make_company(rt.engine, credits=10, name="racer")
    threads, rounds = 10, 3
    for _ in range(rounds):
        key = str(uuid.uuid4())
        barrier = threading.Barrier(threads)

        def submit(key=key, barrier=barrier):
            with requests.Session() as session:
                barrier.wait(timeout=10)
                return session.post(f"{base_url}/v1/jobs", json=KITE, timeout=30,
                                    headers={**auth(company.api_key), "Idempotency-Key": key})

        with ThreadPoolExecutor(threads) as pool:
            responses = list(pool.map(lambda _: submit(), range(threads)))

        accepted = [r for r in responses if r.status_code == 202]
        conflicts = [r for r in responses if r.status_code == 409]
        assert len(accepted) + len(conflicts) == threads, [r.text for r in responses]
        assert {r.json()["code"] for r in conflicts} <= {"IDEMPOTENCY_IN_FLIGHT"}
        assert len({r.json()["jobId"] for r in accepted}) == 1
        originals = [r for r in accepted if "Idempotent-Replayed" not in r.headers]
        assert len(originals) == 1
        # The first request was held in its transaction: the others found it running.
        assert conflicts
    assert count_jobs(rt.engine, company.company_id) == rounds


@pytest.mark.parametrize(("path", "body"), [
    ("/api/generate", {"contentType": "text", "prompt": "once only", "settings": {}}),
    ("/functions/v1/media-start", {"jobType": "image", "params": {"prompt": "once only"}}),
])
def test_the_seed_endpoints_honour_the_key_too(client, company, runtime, path, body):
    headers = {"Authorization": f"Bearer {company.api_key}", "Idempotency-Key": "seed-retry"}
    first = client.post(path, headers=headers, json=body)
    second = client.post(path, headers=headers, json=body)
    assert first.status_code == second.status_code < 300
    assert second.headers["Idempotent-Replayed"] == "true"
    assert second.get_json()["jobId"] == first.get_json()["jobId"]
    assert count_jobs(runtime.engine, company.company_id) == 1
    other = client.post("/v1/jobs", headers=headers,
                        json={"contentType": "text", "prompt": "once only"})
    _assert_envelope(other, 422, "IDEMPOTENCY_KEY_REUSED")  # one key, one endpoint
