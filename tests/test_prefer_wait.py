"""`Prefer: wait=N` on POST /v1/jobs: the finished job in one request, a slow one after N
seconds, the cap, ignored preferences, Idempotency-Key replays, and waiting requests that
cost the database nothing per tick (the hub's one poll serves them all)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from sqlalchemy import event

from api import create_app
from api.prefer import wait_seconds
from tests.builders import auth, make_company
from tests.conftest import runtime_for
from tests.fakes.runway import FakeRunway

CREDITS = 1000
TEXT = {"contentType": "text", "prompt": "a haiku about queues", "settings": {}}
KEY = "sk-runway-key-for-wait-tests"


def _post(client, key, prefer=None, body=None, **headers):
    if prefer is not None:
        headers["Prefer"] = prefer
    return client.post("/v1/jobs", headers={**auth(key), **headers}, json=body or TEXT)


@pytest.mark.e2e
@pytest.mark.postgres
@pytest.mark.redis
def test_a_fast_job_comes_back_finished_in_one_request(api_stack, start_worker):
    env, _rt, client, company = api_stack(CREDITS)
    start_worker(env, queues=["pipeline", "local"], concurrency=2)
    resp = _post(client, company.api_key, "wait=30")
    assert resp.status_code == 200, resp.get_json()
    assert resp.headers["Preference-Applied"] == "wait=30"
    view = resp.get_json()
    assert view["status"] == "completed"
    assert view["result"]["url"]
    assert view["actualCost"] is not None
    same = client.get(f"/v1/jobs/{view['jobId']}", headers=auth(company.api_key)).get_json()
    assert (same["status"], same["actualCost"]) == (view["status"], view["actualCost"])

    # Over 60 counts as 60; RFC 7240's other spellings are understood.
    resp = _post(client, company.api_key, 'respond-async, WAIT="600"; x=y')
    assert (resp.status_code, resp.headers["Preference-Applied"]) == (200, "wait=60")

    # Under an Idempotency-Key the stored answer stays the create answer: a retry
    # replays the 202, and makes no second job.
    first = _post(client, company.api_key, "wait=30", **{"Idempotency-Key": "k-wait-1"})
    assert first.status_code == 200
    assert first.get_json()["status"] == "completed"
    again = _post(client, company.api_key, "wait=30", **{"Idempotency-Key": "k-wait-1"})
    assert again.status_code == 202
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Preference-Applied" not in again.headers
    replayed = again.get_json()
    assert set(replayed) == {"jobId", "status", "estimatedCost"}
    assert replayed["jobId"] == first.get_json()["jobId"]


@pytest.mark.e2e
@pytest.mark.postgres
@pytest.mark.redis
def test_a_slow_job_answers_after_n_seconds_still_running(api_stack, start_worker):
    runway = FakeRunway(api_key=KEY).start()
    runway.config["polls_to_finish"] = 10**9  # renders until the test ends
    try:
        env, _rt, client, company = api_stack(CREDITS, RUNWAY_BASE_URL=runway.url,
                                             RUNWAY_API_KEY=KEY, POLL_INTERVAL_SECONDS="0.2")
        start_worker(env, concurrency=2)
        began = time.monotonic()
        resp = _post(client, company.api_key, "wait=3", body={
            "contentType": "video", "prompt": "a calm sea", "provider": "runway",
            "settings": {"duration": 5}})
        took = time.monotonic() - began
    finally:
        runway.stop()
    assert resp.status_code == 202, resp.get_json()
    assert resp.headers["Preference-Applied"] == "wait=3"
    assert 3 <= took < 8
    view = resp.get_json()
    assert view["status"] in ("queued", "processing")
    assert resp.headers["Location"].endswith(f"/v1/jobs/{view['jobId']}")
    assert {"jobId", "status", "estimatedCost", "progress", "createdAt"} <= view.keys()


@pytest.mark.postgres
@pytest.mark.redis
def test_an_ignored_preference_answers_at_once(api_stack):
    _env, _rt, client, company = api_stack(CREDITS)  # no worker: nothing would ever end
    for prefer in ("wait=0", "wait=-3", "wait=abc", "wait", "wait=1.5", "respond-async",
                   "wait=\u0663"):
        began = time.monotonic()
        resp = _post(client, company.api_key, prefer)
        assert resp.status_code == 202, prefer
        assert "Preference-Applied" not in resp.headers
        assert set(resp.get_json()) == {"jobId", "status", "estimatedCost"}
        assert time.monotonic() - began < 2, prefer


def test_waiting_requests_cost_no_database_poll_each(tmp_path):
    """The embedded mode (SQLite, filesystem broker, no worker): 20 requests wait 2 s at
    once at a 0.05 s tick. Each request makes the statements of a plain submission plus
    a few reads of its job; the hub makes one query per tick for all of them. A poll per
    request per tick would be 40 reads each."""
    rt = runtime_for({"PIPELINE_DATA_DIR": str(tmp_path / "var"),
                      "PIPELINE_ENV_FILE": str(tmp_path / "no.env"),
                      "EVENTS_POLL_SECONDS": "0.05", "RATE_LIMITS_ENABLED": "0"})
    app = create_app(rt)
    company = make_company(rt.engine, CREDITS)
    statements: Counter = Counter()

    @event.listens_for(rt.engine, "before_cursor_execute")
    def _count(_conn, _cursor, _statement, *_args):
        statements[threading.current_thread().name] += 1

    def submit(name, prefer=None):
        threading.current_thread().name = name
        resp = _post(app.test_client(), company.api_key, prefer)
        results[name] = resp.status_code, resp.headers.get("Preference-Applied")

    results: dict = {}
    plain = threading.Thread(target=submit, args=("plain",))
    plain.start()
    plain.join()
    waiting = [threading.Thread(target=submit, args=(f"waiter-{n}", "wait=2"))
               for n in range(20)]
    began = time.monotonic()
    for thread in waiting:
        thread.start()
    for thread in waiting:
        thread.join(30)
    took = time.monotonic() - began
    try:
        assert results.pop("plain") == (202, None)
        assert set(results.values()) == {(202, "wait=2")}
        assert len(results) == 20
        baseline = statements["plain"]
        per_waiter = [statements[f"waiter-{n}"] for n in range(20)]
        # A few reads of the job (when it starts waiting, when the hub starts or first
        # sees the job, when the time is up), each a BEGIN (SQLite's, pipeline/db.py),
        # the row and its queue position: however many ticks pass (40 here).
        assert max(per_waiter) <= baseline + 4 * 3, (baseline, per_waiter)
        ticks = took / 0.05
        hub_queries = statements["job-events hub"]  # a BEGIN and one SELECT per tick
        assert 4 <= hub_queries <= 2 * (ticks + 2), (hub_queries, ticks)
    finally:
        rt.engine.dispose()


@pytest.mark.parametrize(("values", "seconds"), [
    (["wait=5"], 5), (["WAIT = 7"], 7), (['wait="12"'], 12), (["wait=60"], 60),
    (["wait=61"], 60), (["wait=99999999999999999999"], 60), (["respond-async, wait=4"], 4),
    (["wait=4;foo=bar"], 4), (["handling=lenient", "wait=9"], 9), (["wait=3, wait=8"], 3),
    ([], None), ([""], None), (["wait=0"], None), (["wait=-1"], None), (["wait="], None),
    (["wait=1.5"], None), (["wait=x"], None), (["wait"], None), (["respond-async"], None),
    (["wait=\u0661"], None),  # an Arabic-Indic one: a digit to str.isdigit, not to HTTP
])
def test_the_wait_preference_is_read_as_rfc_7240_writes_it(values, seconds):
    assert wait_seconds(values) == seconds
