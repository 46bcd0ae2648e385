"""The seeds' printed examples, sent as printed: accepted in the printed shapes, or refused
with an error that says exactly why (and following it makes the example work).

The seeds live beside the repository (`../shared/seeds`), not in it, so their example
requests and responses are copied here verbatim, each under the seed and section it comes
from; `test_the_copies_are_the_seeds_own` checks them against the seeds wherever those are
reachable. Only the host, the key and the seeds' placeholders are ours.
"""

from __future__ import annotations

import json
import shlex
from datetime import datetime
from pathlib import Path

import pytest

from tests.builders import auth, count_jobs, wait_terminal
from tests.fakes.comfyui import FakeComfyUI
from tests.fakes.openai import FakeOpenAI

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"
SEED_000 = "000_9c60c9dfaea9bff8.txt"
SEED_002 = "002_8c759b3d71b0a955.txt"

# Seed 000, "API Reference" > "Generate Content": endpoint and "Request Body".
GENERATE = "POST /api/generate"
GENERATE_BODY = """\
{
  "userId": "user-uuid",
  "contentType": "text", // "text", "image", "audio", "video"
  "prompt": "A beautiful sunset over mountains",
  "settings": {
    // Provider-specific settings
  },
  "providerName": "openai" // Optional
}"""
# Seed 000, "Generate Content": "Response (202 Accepted)".
GENERATE_ACCEPTED = """\
{
  "jobId": "job-uuid",
  "status": "accepted",
  "estimatedCost": 0.00042
}"""
# Seed 000, "Check Job Status": endpoint and "Response (200 OK)".
PREVIEW = "GET /api/preview/:jobId"
PREVIEW_OK = """\
{
  "jobId": "job-uuid",
  "status": "completed",
  "contentType": "text",
  "createdAt": "2023-07-20T12:00:00Z",
  "updatedAt": "2023-07-20T12:00:05Z",
  "result": {
    "url": "https://your-supabase-url/storage/v1/object/public/generated-content/user-uuid/job-uuid.txt",
    "metadata": {
      "model": "gpt-4",
      "tokens": 42
    }
  },
  "preview": "The sun was setting behind the mountains, casting..."
}"""
# Seed 002, "API Endpoint" and "Request Body".
MEDIA_START = "POST https://your-project.supabase.co/functions/v1/media-start"
MEDIA_START_BODY = """\
{
  "companyId": "uuid-of-company",
  "jobType": "image", // "image" | "video" | "audio"
  "params": {
    "prompt": "A futuristic office", // for images/videos
    "duration": 10, // for videos/audio (seconds)
    "voice": "en-US-Neural2-D", // for audio
    "style": "realistic" // optional style hints
  },
  "provider": "comfyui" // optional: "comfyui" | "runway" | "heygen" | "elevenlabs" | "openai"
}"""
# Seed 002, "Response".
MEDIA_STARTED = """\
{
  "success": true,
  "jobId": "uuid-of-job",
  "status": "queued",
  "provider": "comfyui",
  "estimated_cost": 0,
  "message": "Job queued for ComfyUI processing"
}"""
# Seed 002, "Testing": both curl commands.
CURLS = """\
# Test image generation with ComfyUI
curl -X POST https://your-project.supabase.co/functions/v1/media-start \\
  -H "Authorization: Bearer your-anon-key" \\
  -H "Content-Type: application/json" \\
  -d '{
    "companyId": "your-company-id",
    "jobType": "image",
    "params": {
      "prompt": "a futuristic office with robots"
    },
    "provider": "comfyui"
  }'

# Check job status
curl -X GET https://your-project.supabase.co/functions/v1/media-status?jobId=job-uuid \\
  -H "Authorization: Bearer your-anon-key\""""
# Seed 002, "Job Status Flow": the status words media-status answers with.
MEDIA_STATUS_WORDS = ("queued", "processing", "completed", "failed")
# The README's media-status fields (the seed prints no media-status response).
MEDIA_STATUS_FIELDS = {"success", "jobId", "status", "provider", "estimated_cost",
                       "actual_cost", "asset", "error"}

COPIES = {SEED_000: [GENERATE, GENERATE_BODY, GENERATE_ACCEPTED, PREVIEW, PREVIEW_OK],
          SEED_002: [MEDIA_START, MEDIA_START_BODY, MEDIA_STARTED, CURLS]}
OPENAI_KEY = "sk-platform-openai-5f1c9e2b7a"


def test_the_copies_are_the_seeds_own():
    if not SEEDS.is_dir():
        pytest.skip(f"the seeds are not beside this checkout ({SEEDS})")
    for name, copies in COPIES.items():
        text = (SEEDS / name).read_text(encoding="utf-8")
        for copy in copies:
            assert copy in text, f"{name} no longer prints:\n{copy}"


def _curls(block: str) -> list[dict]:
    """Seed 002's curl lines as requests: method, path (host dropped), headers, body."""
    words = shlex.split(block.replace("\\\n", " "), comments=True)
    requests, current = [], None
    for word, following in zip(words, [*words[1:], None], strict=True):
        if word == "curl":
            current = {"method": "GET", "headers": {}, "body": None}
            requests.append(current)
        elif word == "-X":
            current["method"] = following
        elif word == "-H":
            name, _, value = following.partition(": ")
            current["headers"][name] = value
        elif word == "-d":
            current["body"] = following
        elif word.startswith("https://"):
            current["path"] = "/" + word.split("/", 3)[3]
    return requests


def _send(client, key: str, method: str, path: str, *, body: str | None = None,
          headers: dict | None = None):
    sent = {k: v for k, v in (headers or {}).items() if k.lower() != "authorization"}
    if body is not None:
        sent.setdefault("Content-Type", "application/json")
    return client.open(path, method=method, headers={**sent, **auth(key)},
                       data=None if body is None else body.encode("utf-8"))


def _kind(value) -> str:
    if isinstance(value, bool) or value is None:
        return repr(value) if value is None else "boolean"
    return {int: "number", float: "number", str: "string", list: "array",
            dict: "object"}[type(value)]


def _assert_shape(printed: dict, ours: dict, where: str = "") -> None:
    """Every printed key is ours, with a value of the same JSON type (objects recursively;
    a result's `metadata` is the provider's own)."""
    for key, value in printed.items():
        assert key in ours, f"{where}{key} missing from {ours}"
        assert _kind(ours[key]) == _kind(value), f"{where}{key}: {ours[key]!r} vs {value!r}"
        if isinstance(value, dict) and key != "metadata":
            _assert_shape(value, ours[key], f"{where}{key}.")


def _follow_the_error(client, key: str, path: str, body: str) -> tuple[str, list[dict]]:
    """Send the body while it is not JSON; remove each comment the 400 names, as it says."""
    refusals = []
    while not _is_json(body):
        resp = _send(client, key, "POST", path, body=body)
        answer = resp.get_json()
        assert resp.status_code == 400, answer
        assert answer["details"]["reason"] == "comments are not JSON", answer
        assert len(refusals) < 20, "the refusals never end"
        refusals.append(answer)
        lines = body.split("\n")
        line, column = answer["details"]["line"], answer["details"]["column"]
        assert lines[line - 1][column - 1:].startswith("//"), answer
        lines[line - 1] = lines[line - 1][:column - 1].rstrip()
        body = "\n".join(lines)
    return body, refusals


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize(("endpoint", "body", "placeholder", "comments"), [
    (GENERATE, GENERATE_BODY, "user-uuid", 3),
    (MEDIA_START, MEDIA_START_BODY, "uuid-of-company", 6),
], ids=["seed-000", "seed-002"])
def test_a_printed_body_with_comments_is_refused_saying_where_the_comment_is(
        api_stack, endpoint, body, placeholder, comments):
    _env, rt, client, company = api_stack(10)
    method, url = endpoint.split(" ")
    path = "/" + url.split("/", 3)[3] if url.startswith("https://") else url
    own = str(company.user_id if placeholder == "user-uuid" else company.company_id)
    sent = body.replace(placeholder, own)
    first = sent.split("\n").index(next(ln for ln in sent.split("\n") if "//" in ln))

    resp = _send(client, company.api_key, method, path, body=sent)

    assert resp.status_code == 400, resp.get_data(as_text=True)
    answer = resp.get_json()
    column = sent.split("\n")[first].index("//") + 1
    assert answer == {
        "error": "The request body is not valid JSON. JSON does not allow comments: remove "
                 f"the `// ...` at line {first + 1}, column {column}.",
        "code": "VALIDATION_ERROR",
        "details": {"line": first + 1, "column": column, "reason": "comments are not JSON"},
    }
    # Each comment is named in turn, and the body without them is JSON.
    _fixed, refusals = _follow_the_error(client, company.api_key, path, sent)
    assert len(refusals) == comments
    assert count_jobs(rt.engine, company.company_id) == 0


@pytest.mark.e2e
def test_the_printed_examples_run_and_answer_in_the_printed_shapes(api_stack, start_worker):
    comfy, openai = FakeComfyUI().start(), FakeOpenAI(api_key=OPENAI_KEY).start()
    try:
        env, rt, client, company = api_stack(
            1000, COMFY_WORKER_URL=comfy.url, OPENAI_BASE_URL=f"{openai.url}/v1",
            OPENAI_API_KEY=OPENAI_KEY, POLL_INTERVAL_SECONDS="0.1")
        key, company_id = company.api_key, str(company.company_id)

        # Seed 002's curl, as printed: its response is the printed one, jobId apart.
        start, status = _curls(CURLS)
        resp = _send(client, key, start["method"], start["path"],
                     body=start["body"].replace("your-company-id", company_id),
                     headers=start["headers"])
        assert resp.status_code == 200, resp.get_data(as_text=True)
        started = resp.get_json()
        printed = json.loads(MEDIA_STARTED)
        _assert_shape(printed, started)
        assert set(started) == set(printed)
        assert {**started, "jobId": "uuid-of-job"} == printed
        curl_job = started["jobId"]
        status_path = status["path"].replace("job-uuid", curl_job)
        resp = _send(client, key, status["method"], status_path, headers=status["headers"])
        assert resp.status_code == 200, resp.get_data(as_text=True)
        assert set(resp.get_json()) >= MEDIA_STATUS_FIELDS
        assert resp.get_json()["status"] in MEDIA_STATUS_WORDS

        # Seed 002's request body, its comments removed as the error says; and as audio on
        # the local provider, with the printed cloud voice.
        body, _ = _follow_the_error(client, key, "/functions/v1/media-start",
                                    MEDIA_START_BODY.replace("uuid-of-company", company_id))
        media_jobs = {}
        for job_type, provider in (("image", "comfyui"), ("audio", "local")):
            sent = (body.replace('"jobType": "image"', f'"jobType": "{job_type}"')
                    .replace('"provider": "comfyui"', f'"provider": "{provider}"'))
            resp = _send(client, key, "POST", "/functions/v1/media-start", body=sent)
            assert resp.status_code == 200, resp.get_data(as_text=True)
            _assert_shape(printed, resp.get_json())
            assert resp.get_json()["provider"] == provider
            media_jobs[resp.get_json()["jobId"]] = job_type

        # Seed 000's request body, its comments removed as the error says.
        body, _ = _follow_the_error(client, key, "/api/generate",
                                    GENERATE_BODY.replace("user-uuid", str(company.user_id)))
        method, path = GENERATE.split(" ")
        resp = _send(client, key, method, path, body=body)
        assert resp.status_code == 202, resp.get_data(as_text=True)
        accepted = resp.get_json()
        _assert_shape(json.loads(GENERATE_ACCEPTED), accepted)
        assert accepted["status"] == "accepted"

        start_worker(env)
        finished = wait_terminal(rt.engine, [curl_job, accepted["jobId"], *media_jobs], 60)
        assert set(finished.values()) == {"completed"}, finished

        # The status endpoints answer the finished jobs in the printed shapes.
        method, path = PREVIEW.split(" ")
        resp = _send(client, key, method, path.replace(":jobId", accepted["jobId"]))
        assert resp.status_code == 200, resp.get_data(as_text=True)
        preview, printed = resp.get_json(), json.loads(PREVIEW_OK)
        _assert_shape(printed, preview)
        assert (preview["status"], preview["contentType"]) == ("completed", "text")
        for stamp in ("createdAt", "updatedAt"):
            datetime.fromisoformat(preview[stamp])
        for job_id, job_type in {curl_job: "image", **media_jobs}.items():
            resp = _send(client, key, status["method"],
                         status["path"].replace("job-uuid", job_id), headers=status["headers"])
            answer = resp.get_json()
            assert (answer["status"], answer["jobId"]) == ("completed", job_id), answer
            assert answer["asset"]["contentType"].startswith(job_type), answer
    finally:
        comfy.stop()
        openai.stop()
