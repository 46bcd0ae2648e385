"""GET /v1/jobs/<id>/attempts (a job's attempt log) and the `input` of the job view:
through a real worker, through the lifecycle functions a worker calls, scoped by company."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from pipeline import lifecycle
from tests.builders import auth, make_company, wait_terminal

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


def _submit(client, key: str, **body) -> str:
    body = {"contentType": "text", "prompt": "a haiku about tides", **body}
    resp = client.post("/v1/jobs", json=body, headers=auth(key))
    assert resp.status_code == 202, resp.get_json()
    return resp.get_json()["jobId"]


def _attempts(client, key: str, job_id: str):
    return client.get(f"/v1/jobs/{job_id}/attempts", headers=auth(key))


@pytest.mark.e2e
def test_a_job_run_by_a_worker_logs_its_attempt(api_stack, start_worker):
    env, rt, client, company = api_stack(20)
    start_worker(env, queues=["pipeline", "local"], concurrency=1)
    job_id = _submit(client, company.api_key, provider="local", settings={"maxTokens": 20})
    assert wait_terminal(rt.engine, [job_id]) == {job_id: "completed"}

    resp = _attempts(client, company.api_key, job_id)
    assert resp.status_code == 200, resp.get_json()
    (attempt,) = resp.get_json()["attempts"]
    assert (attempt["number"], attempt["provider"], attempt["outcome"], attempt["error"]) \
        == (1, "local", "succeeded", None)
    started = datetime.fromisoformat(attempt["startedAt"])
    finished = datetime.fromisoformat(attempt["finishedAt"])
    assert started <= finished <= datetime.now(UTC)
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(company.api_key)).get_json()[
        "attempts"] == 1


def test_the_log_shows_each_start_and_its_error_without_secrets(api_stack):
    """A failed start and one still running, recorded as a worker records them (no worker
    runs here: the job waits in its queue)."""
    _env, rt, client, company = api_stack(20)
    job_id = _submit(client, company.api_key, provider="local")
    assert _attempts(client, company.api_key, job_id).get_json() == {"attempts": []}

    deadline = datetime.now(UTC) + timedelta(minutes=5)
    number, _ = lifecycle.begin_attempt(rt.engine, uuid.UUID(job_id), "comfyui",
                                        deadline_at=deadline)
    lifecycle.finish_attempt(
        rt.engine, uuid.UUID(job_id), number, outcome="transient",
        error_code="PROVIDER_UNAVAILABLE",
        error="comfyui: ConnectionError calling admin:hunter2@gpu-1:8188/prompt",
        remote_id="http://gpu-1:8188|prompt-1")
    lifecycle.begin_attempt(rt.engine, uuid.UUID(job_id), "local", deadline_at=deadline)

    resp = _attempts(client, company.api_key, job_id)
    assert resp.status_code == 200
    first, second = resp.get_json()["attempts"]
    assert (first["number"], first["provider"], first["outcome"]) == (1, "comfyui", "transient")
    assert first["error"] == {"code": "PROVIDER_UNAVAILABLE",
                              "message": "comfyui: ConnectionError calling gpu-1:8188/prompt"}
    assert first["finishedAt"] is not None
    assert (second["number"], second["provider"], second["outcome"], second["error"],
            second["finishedAt"]) == (2, "local", None, None, None)
    text = resp.get_data(as_text=True)
    assert "hunter2" not in text
    assert "prompt-1" not in text  # the remote id names the instance: never shown


def test_another_companys_job_is_not_found_as_reading_it_is(api_stack):
    _env, rt, client, company = api_stack(20)
    other = make_company(rt.engine, credits=5, name="other")
    job_id = _submit(client, company.api_key, provider="local")

    theirs = _attempts(client, other.api_key, job_id)
    reading = client.get(f"/v1/jobs/{job_id}", headers=auth(other.api_key))
    assert (theirs.status_code, reading.status_code) == (404, 404)
    assert theirs.get_json() == reading.get_json()
    assert theirs.get_json()["code"] == "JOB_NOT_FOUND"
    for bad in ("not-a-uuid", str(uuid.uuid4())):
        resp = _attempts(client, company.api_key, bad)
        assert (resp.status_code, resp.get_json()["code"]) == (404, "JOB_NOT_FOUND")
    assert client.get(f"/v1/jobs/{job_id}/attempts").status_code == 401


def test_the_job_view_carries_its_input_for_a_retry(api_stack):
    _env, _rt, client, company = api_stack(20)
    settings = {"maxTokens": 30, "temperature": 0.5}
    pinned = _submit(client, company.api_key, prompt="pinned", provider="local",
                     settings=settings)
    routed = _submit(client, company.api_key, prompt="routed")

    view = client.get(f"/v1/jobs/{pinned}", headers=auth(company.api_key)).get_json()
    assert view["input"] == {"contentType": "text", "prompt": "pinned", "settings": settings,
                             "provider": "local"}
    # Routing chose its provider: a retry is routed afresh, so none is given.
    listed = client.get("/v1/jobs", headers=auth(company.api_key)).get_json()["jobs"]
    by_id = {job["jobId"]: job for job in listed}
    assert by_id[routed]["input"] == {"contentType": "text", "prompt": "routed",
                                      "settings": {}}
    assert by_id[pinned]["input"] == view["input"]

    # The input, sent back as it is, makes the same job again.
    again = client.post("/v1/jobs", json=view["input"], headers=auth(company.api_key))
    assert again.status_code == 202, again.get_json()
    copy = client.get(f"/v1/jobs/{again.get_json()['jobId']}",
                      headers=auth(company.api_key)).get_json()
    assert copy["input"] == view["input"]


def test_the_attempt_log_and_input_are_documented(api_stack):
    _env, _rt, client, _company = api_stack(5)
    spec = client.get("/openapi.json").get_json()
    operation = spec["paths"]["/v1/jobs/{job_id}/attempts"]["get"]
    assert "JOB_NOT_FOUND" in operation["responses"]["404"]["description"]
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/AttemptList"}
    schemas = spec["components"]["schemas"]
    assert set(schemas["Attempt"]["properties"]) == {
        "number", "provider", "outcome", "error", "startedAt", "finishedAt"}
    assert {"$ref": "#/components/schemas/JobInput"} in schemas["Job"]["properties"]["input"][
        "allOf"]
    assert set(schemas["JobInput"]["properties"]) == {"contentType", "prompt", "settings",
                                                      "provider"}
