"""GET /v1/jobs/<id>/events through a real HTTP server and real workers, on each transport:
Redis pub/sub (PostgreSQL + Redis broker), PostgreSQL LISTEN/NOTIFY (PostgreSQL + RabbitMQ)
and the embedded poll (SQLite + filesystem broker); and the same stream under gunicorn's
gthread worker, event by event."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
import uuid
from urllib.parse import urlsplit

import pytest
import requests

from api import create_app
from pipeline import jobevents, lifecycle
from pipeline.config import ConfigError, Settings
from pipeline.jobevents import EventId, passed
from service import announce
from service.stack import free_port
from tests.builders import auth, make_company, serving, wait_for
from tests.conftest import ROOT, runtime_for
from tests.fakes.runway import FakeRunway

KEY = "sk-runway-key-for-event-tests"
CREDITS = 1000
VIDEO = {"contentType": "video", "prompt": "a calm sea", "provider": "runway",
         "settings": {"duration": 5}}
# Runway's fake reports 0.5 while RUNNING: four polls at 0.3 s give a stream time to see it.
FAKE_ENV = {"POLL_INTERVAL_SECONDS": "0.3", "EVENTS_KEEPALIVE_SECONDS": "0.5",
            "EVENTS_POLL_SECONDS": "0.1", "RUNWAY_API_KEY": KEY}


class EventStream:
    """A Server-Sent Events client over http.client, which reads a chunked body line by
    line as it arrives (the point of the test: nothing may wait in a buffer)."""

    def __init__(self, base_url: str, key: str | None, job_id: str, *,
                 last_event_id: str | None = None, timeout: float = 60):
        parts = urlsplit(base_url)
        self.conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
        headers = {"Accept": "text/event-stream", **(auth(key) if key else {})}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        self.conn.request("GET", f"/v1/jobs/{job_id}/events", headers=headers)
        self.response = self.conn.getresponse()
        self.frames = self._frames()

    def _frames(self):
        """Each event as a dict of its fields, each comment as {"comment": text}, until
        the server closes the stream."""
        fields: dict[str, str] = {}
        while True:
            raw = self.response.readline()
            if not raw:
                if fields:
                    yield fields
                return
            line = raw.decode("utf-8").rstrip("\r\n")
            if not line:
                if fields:
                    yield fields
                fields = {}
            elif line.startswith(":"):
                yield {"comment": line[1:].strip()}
            else:
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")

    def rest(self) -> list[dict]:
        return list(self.frames)

    def close(self) -> None:
        self.conn.close()


def _events(frames) -> list[tuple[str, str]]:
    return [(f["id"], f["event"]) for f in frames if "event" in f]


@pytest.fixture
def runway():
    fake = FakeRunway(api_key=KEY).start()
    fake.config["polls_to_finish"] = 5
    yield fake
    fake.stop()


@pytest.fixture(params=["redis", "postgres", "poll"])
def backend(request, runway, tmp_path):
    """(worker env, runtime, API base URL, company, transport kind) on one transport."""
    extra = {**FAKE_ENV, "RUNWAY_BASE_URL": runway.url}
    if request.param == "poll":  # the embedded default
        env = {"PIPELINE_DATA_DIR": str(tmp_path / "var"),
               "PIPELINE_ENV_FILE": str(tmp_path / "no.env"),
               "DATABASE_URL": f"sqlite:///{tmp_path}/events.db",
               "CELERY_BROKER_URL": "filesystem://",
               "STORAGE_URL": f"file://{tmp_path}/store", **extra}
        rt = runtime_for(env)
    else:
        if request.param == "postgres":
            extra["CELERY_BROKER_URL"] = request.getfixturevalue("rabbitmq_url")
        env, rt, _client, _company = request.getfixturevalue("api_stack")(CREDITS, **extra)
    try:
        with serving(create_app(rt)) as url:
            yield env, rt, url, make_company(rt.engine, CREDITS), \
                announce.transport_of(rt.settings).kind
    finally:
        rt.engine.dispose()


def _submit(url: str, key: str, body=None) -> str:
    resp = requests.post(f"{url}/v1/jobs", headers=auth(key), json=body or VIDEO, timeout=30)
    assert resp.status_code == 202, resp.text
    return resp.json()["jobId"]


@pytest.mark.e2e
@pytest.mark.postgres
@pytest.mark.redis
def test_a_client_follows_a_job_live_then_resumes_after_its_last_event(
        backend, request, start_worker):
    env, _rt, url, company, kind = backend
    assert kind == request.node.callspec.params["backend"]
    job_id = _submit(url, company.api_key)  # no worker yet: it waits in the queue

    stream = EventStream(url, company.api_key, job_id)
    assert stream.response.status == 200
    assert stream.response.getheader("Content-Type").startswith("text/event-stream")
    assert stream.response.getheader("Cache-Control") == "no-cache"
    assert stream.response.getheader("X-Accel-Buffering") == "no"
    assert next(stream.frames) == {"retry": "2000"}
    queued = next(stream.frames)
    assert (queued["id"], queued["event"]) == ("1", "queued")
    assert json.loads(queued["data"])["status"] == "queued"
    assert next(stream.frames) == {"comment": "keep-alive"}  # nothing happens meanwhile

    start_worker(env, concurrency=2)
    live = stream.rest()  # returns only when the server ends the stream
    stream.close()
    events = _events(live)
    assert [e for _, e in events if e != "progress"] == ["processing", "completed"]
    assert ("3.500", "progress") in events  # Runway's fake says 0.5 while it renders
    ids = [EventId.parse(i) for i, _ in events]
    assert ids == sorted(set(ids))  # in order, none twice
    assert events[-1] == ("9", "completed")
    final = json.loads([f for f in live if "event" in f][-1]["data"])
    view = requests.get(f"{url}/v1/jobs/{job_id}", headers=auth(company.api_key),
                        timeout=10).json()
    assert final["status"] == view["status"] == "completed"
    assert (final["actualCost"], final["progress"]) == (view["actualCost"], 1.0)
    assert final["result"]["contentType"] == "video/mp4"

    # Resuming after "3.500" sends only what followed; after the end, nothing.
    again = EventStream(url, company.api_key, job_id, last_event_id="3.500")
    assert _events(again.rest()) == [("3.1000", "progress"), ("9", "completed")]
    assert EventStream(url, company.api_key, job_id, last_event_id="9").rest() == [
        {"retry": "2000"}]
    # A late client without an id gets every stage the job passed, then the stream ends.
    assert _events(EventStream(url, company.api_key, job_id).rest()) == [
        ("1", "queued"), ("2", "processing"), ("3.1000", "progress"), ("9", "completed")]
    # An id this API never writes is ignored: everything again.
    assert len(_events(EventStream(url, company.api_key, job_id,
                                   last_event_id="banana").rest())) == 4


@pytest.mark.postgres
@pytest.mark.redis
def test_another_companys_job_or_no_key_is_refused_before_any_stream(backend):
    _env, rt, url, company, _kind = backend
    other = make_company(rt.engine, CREDITS, name="other")
    theirs = _submit(url, other.api_key)
    for job_id in (theirs, "00000000-0000-0000-0000-000000000000", "not-a-uuid"):
        refused = EventStream(url, company.api_key, job_id, timeout=10)
        assert refused.response.status == 404
        body = json.loads(refused.response.read())
        assert body == {"error": "No such job.", "code": "JOB_NOT_FOUND",
                        "details": {"jobId": job_id}}
    anonymous = EventStream(url, None, theirs, timeout=10)
    assert anonymous.response.status == 401
    assert json.loads(anonymous.response.read())["code"] == "UNAUTHORIZED"


@pytest.mark.postgres
@pytest.mark.redis
def test_a_cancel_ends_the_stream_with_its_event(api_stack):
    """A change made in the API process (a cancel) reaches streams the same way."""
    _env, rt, _client, company = api_stack(CREDITS, EVENTS_KEEPALIVE_SECONDS="30")
    with serving(create_app(rt)) as url:
        job_id = _submit(url, company.api_key, {"contentType": "text", "prompt": "hello",
                                                "settings": {}})
        stream = EventStream(url, company.api_key, job_id, timeout=20)
        assert _events([next(stream.frames), next(stream.frames)]) == [("1", "queued")]
        began = time.monotonic()
        resp = requests.post(f"{url}/v1/jobs/{job_id}/cancel", headers=auth(company.api_key),
                             timeout=10)
        assert resp.status_code == 200
        # Woken by the wake-up: well before the 30 s keep-alive read would find it.
        assert _events(stream.rest()) == [("9", "cancelled")]
        assert time.monotonic() - began < 10


@pytest.mark.postgres
@pytest.mark.redis
def test_a_lost_wake_up_only_delays_the_event_to_the_next_keep_alive(api_stack):
    _env, rt, _client, company = api_stack(CREDITS, EVENTS_KEEPALIVE_SECONDS="0.5")
    with serving(create_app(rt)) as url:
        job_id = _submit(url, company.api_key, {"contentType": "text", "prompt": "hello",
                                                "settings": {}})
        stream = EventStream(url, company.api_key, job_id, timeout=20)
        assert _events([next(stream.frames), next(stream.frames)]) == [("1", "queued")]
        # A wake-up already on its way (the hub wakes its streams once it has subscribed:
        # what came before may have been missed) would find the change below at once;
        # a keep-alive first says it has passed, and the pause lets that keep-alive's own
        # read of the job (just after the comment) end before the change.
        assert next(stream.frames) == {"comment": "keep-alive"}
        time.sleep(0.1)
        previous = jobevents.installed()
        jobevents.install(jobevents.Announcer())  # this change wakes nobody
        try:
            lifecycle.fail(rt.engine, uuid.UUID(job_id), code="CANCELLED",
                           message="Cancelled by a test.", status="cancelled")
        finally:
            jobevents.install(previous)
        rest = stream.rest()
        assert rest[-2:] == [{"comment": "keep-alive"}, rest[-1]]
        assert _events(rest) == [("9", "cancelled")]


@pytest.mark.e2e
@pytest.mark.postgres
@pytest.mark.redis
def test_gunicorn_gthread_sends_each_event_as_it_happens(
        api_stack, runway, start_worker, tmp_path):
    """compose.yaml's server (gunicorn, gthread worker): the stream's first events and
    keep-alives arrive while the job is still queued, so nothing sits in a buffer."""
    env, _rt, _client, company = api_stack(CREDITS, RUNWAY_BASE_URL=runway.url, **FAKE_ENV)
    port = free_port()
    log = open(tmp_path / "gunicorn.log", "ab")  # noqa: SIM115
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-c", "python:service.gunicorn_conf",
         "--bind", f"127.0.0.1:{port}", "--workers", "1", "--threads", "4",
         "api.wsgi:create()"],
        cwd=ROOT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _answers(url), timeout=30, message="gunicorn to answer")
        job_id = _submit(url, company.api_key)
        stream = EventStream(url, company.api_key, job_id)
        assert stream.response.status == 200
        first = [next(stream.frames) for _ in range(4)]
        assert first == [{"retry": "2000"},
                         {"id": "1", "event": "queued", "data": first[1]["data"]},
                         {"comment": "keep-alive"}, {"comment": "keep-alive"}]
        start_worker(env, concurrency=2)
        assert _events(stream.rest())[-1] == ("9", "completed")
    finally:
        server.terminate()
        server.wait(20)
        log.close()


def _answers(url: str) -> bool:
    try:
        return requests.get(f"{url}/healthz", timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


class _Row:
    def __init__(self, **values):
        self.__dict__.update({"queued_at": None, "started_at": None, "progress": None,
                              "status": "pending", **values})


@pytest.mark.parametrize(("row", "expected"), [
    ({}, []),
    ({"queued_at": 1, "status": "queued"}, [("1", "queued")]),
    ({"queued_at": 1, "started_at": 2, "status": "processing", "progress": 0.2504},
     [("1", "queued"), ("2", "processing"), ("3.250", "progress")]),
    ({"status": "cancelled"}, [("9", "cancelled")]),
    ({"queued_at": 1, "started_at": 2, "status": "failed"},
     [("1", "queued"), ("2", "processing"), ("9", "failed")]),
])
def test_the_events_a_job_has_passed_follow_its_row(row, expected):
    assert [(str(i), e) for i, e in passed(_Row(**row))] == expected


@pytest.mark.parametrize(("text", "parsed"), [
    ("1", EventId(1)), ("2", EventId(2)), ("3.0", EventId(3, 0)), ("3.1000", EventId(3, 1000)),
    ("9", EventId(9)), (" 9 ", EventId(9)), ("3", None), ("3.1001", None), ("1.5", None),
    ("4", None), ("", None), (None, None), ("-1", None), ("3.-5", None), ("٣.5", None),
])
def test_event_ids_parse_only_as_written(text, parsed):
    assert EventId.parse(text) == parsed
    assert EventId(1) < EventId(2) < EventId(3, 0) < EventId(3, 999) < EventId(3, 1000) \
        < EventId(9)


PG = "postgresql://db.example/pipeline"


@pytest.mark.parametrize(("env", "kind", "channel"), [
    ({}, "poll", ""),
    ({"CELERY_BROKER_URL": "redis://r:6379/0", "CELERY_BROKER_KEY_PREFIX": "p1:"},
     "redis", "p1:pipeline:job-events"),
    ({"DATABASE_URL": PG, "CELERY_BROKER_URL": "amqp://mq//"}, "postgres",
     "pipeline_job_events"),
    ({"DATABASE_URL": PG, "CELERY_BROKER_URL": "redis://r/0"}, "redis", "pipeline:job-events"),
    ({"DATABASE_URL": PG, "CELERY_BROKER_URL": "redis://r/0", "EVENTS_URL": "postgresql"},
     "postgres", "pipeline_job_events"),
    ({"DATABASE_URL": PG, "EVENTS_URL": "redis://events:6379/3"}, "redis",
     "pipeline:job-events"),
    ({"DATABASE_URL": PG, "EVENTS_URL": "poll"}, "poll", ""),
])
def test_the_transport_follows_the_deployment(tmp_path, env, kind, channel):
    settings = Settings.from_env(environ={"PIPELINE_DATA_DIR": str(tmp_path),
                                          "PIPELINE_ENV_FILE": str(tmp_path / "no.env"),
                                          **env}, secret_key="k", provider_key_secrets=())
    transport = announce.transport_of(settings)
    assert (transport.kind, transport.channel) == (kind, channel)
    if env.get("EVENTS_URL", "").startswith("redis"):
        assert transport.url == env["EVENTS_URL"]


@pytest.mark.parametrize("events_url", ["postgresql", "kafka://k:9092"])
def test_an_events_url_the_deployment_cannot_use_is_refused(tmp_path, events_url):
    settings = Settings.from_env(environ={"PIPELINE_DATA_DIR": str(tmp_path),
                                          "PIPELINE_ENV_FILE": str(tmp_path / "no.env"),
                                          "EVENTS_URL": events_url})
    with pytest.raises(ConfigError, match="EVENTS_URL"):
        announce.transport_of(settings)
