"""The HTTP API over real PostgreSQL and a real Redis broker (no workers needed here)."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from api import create_app
from tests.builders import auth, count_jobs, make_company, wallet_of
from tests.conftest import distributed_env, runtime_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


@pytest.fixture(scope="module")
def runtime(pg_database, module_redis_prefix, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    env = distributed_env(tmp, pg_database, module_redis_prefix,
                          storage_url=f"file://{tmp}/storage")
    rt = runtime_for(env)
    yield rt
    rt.engine.dispose()


@pytest.fixture
def client(runtime):
    return create_app(runtime).test_client()


@pytest.fixture
def company(runtime):
    return make_company(runtime.engine, credits=10)


def _assert_envelope(resp, status: int, code: str):
    assert resp.status_code == status, resp.get_data(as_text=True)
    body = resp.get_json()
    assert set(body) == {"error", "code", "details"}
    assert body["code"] == code
    assert body["error"]
    return body


def test_submit_returns_202_with_id_status_and_estimate(client, company, runtime):
    resp = client.post("/v1/jobs", headers=auth(company.api_key),
                       json={"contentType": "image", "prompt": "a red kite",
                             "settings": {"width": 100, "height": 100}})
    assert resp.status_code == 202
    body = resp.get_json()
    assert body["status"] == "queued"
    assert body["estimatedCost"] == "0.002000"  # 0.01 megapixels x 0.2 credits
    uuid.UUID(body["jobId"])
    assert resp.headers["Location"].endswith(f"/v1/jobs/{body['jobId']}")
    view = client.get(f"/v1/jobs/{body['jobId']}", headers=auth(company.api_key)).get_json()
    assert view["status"] == "queued"
    assert view["provider"] == "local"
    assert view["result"] is None


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"contentType": "hologram", "prompt": "x"}, "contentType"),
        ({"contentType": "text", "prompt": ""}, "prompt"),
        ({"contentType": "text", "prompt": "   "}, "prompt"),
        ({"contentType": "text", "prompt": "x" * 4001}, "prompt"),
        ({"contentType": "text", "prompt": "x", "settings": "loud"}, "settings"),
        ({"contentType": "text", "prompt": "x", "settings": [1, 2]}, "settings"),
        ({"contentType": "text"}, "prompt"),
        ({"prompt": "x"}, "contentType"),
        ({"contentType": "image", "prompt": "x", "settings": {"width": 99999}}, "settings"),
        ({"contentType": "text", "prompt": "x", "provider": "nobody"}, "provider"),
        ({"contentType": "text", "prompt": "x", "surprise": 1}, "surprise"),
    ],
)
def test_bad_input_gets_the_envelope_and_writes_nothing(client, company, runtime, payload,
                                                        field):
    before = count_jobs(runtime.engine, company.company_id)
    resp = client.post("/v1/jobs", headers=auth(company.api_key), json=payload)
    body = _assert_envelope(resp, 400, "VALIDATION_ERROR")
    assert field in str(body["details"]) or field in body["error"]
    assert count_jobs(runtime.engine, company.company_id) == before


def test_malformed_json_is_a_validation_error(client, company, runtime):
    resp = client.post("/v1/jobs", headers={**auth(company.api_key),
                                            "Content-Type": "application/json"},
                       data='{"contentType": "text", "prompt": ')
    _assert_envelope(resp, 400, "VALIDATION_ERROR")
    assert count_jobs(runtime.engine, company.company_id) == 0


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer cp_nope"},
                                     {"Authorization": "Basic abc"},
                                     {"Authorization": "Bearer "}])
def test_missing_or_wrong_key_is_401(client, headers):
    resp = client.post("/v1/jobs", headers=headers, json={"contentType": "text", "prompt": "x"})
    _assert_envelope(resp, 401, "UNAUTHORIZED")


def test_another_companys_job_is_not_found(client, company, runtime):
    other = make_company(runtime.engine, credits=5, name="other")
    job_id = client.post("/v1/jobs", headers=auth(other.api_key),
                         json={"contentType": "text", "prompt": "secret plans"}
                         ).get_json()["jobId"]
    resp = client.get(f"/v1/jobs/{job_id}", headers=auth(company.api_key))
    _assert_envelope(resp, 404, "JOB_NOT_FOUND")
    listed = client.get("/v1/jobs", headers=auth(company.api_key)).get_json()["jobs"]
    assert job_id not in {j["jobId"] for j in listed}
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(other.api_key)).status_code == 200


def test_unknown_and_malformed_job_ids_are_not_found(client, company):
    for job_id in (str(uuid.uuid4()), "not-a-uuid"):
        resp = client.get(f"/v1/jobs/{job_id}", headers=auth(company.api_key))
        _assert_envelope(resp, 404, "JOB_NOT_FOUND")


def test_402_when_the_wallet_plainly_cannot_cover_the_estimate(client, runtime):
    poor = make_company(runtime.engine, credits="0.001", name="poor")
    resp = client.post("/v1/jobs", headers=auth(poor.api_key),
                       json={"contentType": "video", "prompt": "a long film",
                             "settings": {"duration": 30}})
    body = _assert_envelope(resp, 402, "INSUFFICIENT_CREDITS")
    assert body["details"]["required"] == "1.500000"
    assert count_jobs(runtime.engine, poor.company_id) == 0
    assert wallet_of(runtime.engine, poor.company_id).credits_available == Decimal("0.001")


def test_openapi_document_describes_the_job_endpoints(client):
    spec = client.get("/openapi.json").get_json()
    assert "/v1/jobs" in spec["paths"]
    assert "/v1/jobs/{job_id}" in spec["paths"]
    assert "202" in spec["paths"]["/v1/jobs"]["post"]["responses"]
    assert client.get("/docs").status_code == 200


def test_seed_000_generate_and_preview(client, company):
    resp = client.post("/api/generate", headers=auth(company.api_key),
                       json={"userId": str(company.user_id), "contentType": "text",
                             "prompt": "A beautiful sunset over mountains", "settings": {}})
    assert resp.status_code == 202
    body = resp.get_json()
    assert body["status"] == "accepted"
    assert isinstance(body["estimatedCost"], float)
    preview = client.get(f"/api/preview/{body['jobId']}", headers=auth(company.api_key))
    assert preview.status_code == 200
    assert preview.get_json()["status"] == "pending"
    assert set(preview.get_json()) >= {"jobId", "status", "contentType", "createdAt",
                                       "updatedAt", "result", "preview"}


def test_seed_002_media_start_and_status(client, company, runtime):
    resp = client.post("/functions/v1/media-start", headers=auth(company.api_key),
                       json={"companyId": str(company.company_id), "jobType": "audio",
                             "params": {"prompt": "Welcome aboard", "voice": "en"}})
    assert resp.status_code == 200, resp.get_json()
    body = resp.get_json()
    assert body["success"] is True
    assert body["status"] == "queued"
    assert body["provider"] == "local"
    status = client.get(f"/functions/v1/media-status?jobId={body['jobId']}",
                        headers=auth(company.api_key)).get_json()
    assert status["status"] == "queued"

    other = make_company(runtime.engine, credits=1, name="other")
    resp = client.post("/functions/v1/media-start", headers=auth(company.api_key),
                       json={"companyId": str(other.company_id), "jobType": "image",
                             "params": {"prompt": "x"}})
    _assert_envelope(resp, 403, "FORBIDDEN")
    resp = client.post("/functions/v1/media-start", headers=auth(company.api_key),
                       json={"jobType": "text", "params": {"prompt": "x"}})
    _assert_envelope(resp, 400, "VALIDATION_ERROR")


def test_signed_file_links_refuse_tampering_and_expiry(client, runtime):
    runtime.storage.put("c/j/output.txt", b"hello", "text/plain")
    url = runtime.storage.url("c/j/output.txt", 60).replace(runtime.settings.public_url, "")
    assert client.get(url).data == b"hello"
    tampered = url.replace("output.txt", "other.txt")
    _assert_envelope(client.get(tampered), 403, "LINK_EXPIRED")
    expired = runtime.storage.url("c/j/output.txt", -10).replace(runtime.settings.public_url, "")
    _assert_envelope(client.get(expired), 403, "LINK_EXPIRED")


@pytest.mark.parametrize("where", [("/v1/jobs", "provider"), ("/api/generate", "providerName"),
                                   ("/api/generate", "provider")])
@pytest.mark.parametrize("value", [["openai"], {"name": "openai"}, 7])
def test_a_provider_that_is_not_a_name_is_a_400_that_writes_nothing(
        client, company, runtime, where, value):
    path, field = where
    before = count_jobs(runtime.engine, company.company_id)
    resp = client.post(path, headers=auth(company.api_key),
                       json={"contentType": "image", "prompt": "a boat", field: value})
    assert resp.status_code == 400, resp.get_data(as_text=True)
    assert resp.get_json()["code"] == "VALIDATION_ERROR"
    assert count_jobs(runtime.engine, company.company_id) == before


def test_a_known_provider_left_unconfigured_is_not_configured_not_unknown(client, company):
    resp = client.post("/v1/jobs", headers=auth(company.api_key),
                       json={"contentType": "image", "prompt": "a boat", "provider": "comfyui"})
    body = _assert_envelope(resp, 400, "PROVIDER_NOT_CONFIGURED")
    assert "COMFY_WORKER_URL" in body["error"]
