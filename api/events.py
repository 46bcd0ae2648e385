"""/v1/jobs/<id>/events: a job's status as Server-Sent Events, until it ends.

Each event's data is the job as `GET /v1/jobs/<id>` shows it, read from the database when
the process's hub (service/jobhub.py) says the job changed, and at every keep-alive, so
a lost wake-up only delays an event. Event ids follow the job's stages
(pipeline.jobevents.EventId), which is what lets `Last-Event-ID` resume a stream without
any stored history.

A stream holds a server thread, not a process, while it waits: under gunicorn use the
gthread worker (`--threads`, README); the embedded server is threaded already.
"""

from __future__ import annotations

import json

from flask import Response, current_app, request
from flask.views import MethodView
from flask_smorest import Blueprint

from api import schemas
from api.auth import current_principal
from pipeline import jobevents, listing
from pipeline import jobs as jobs_uc
from pipeline.errors import NotFound
from service.jobhub import hub_for

HUB = "job_hub"
RETRY_MS = 2000
KEEP_ALIVE = ": keep-alive\n\n"

blp = Blueprint("events", __name__, url_prefix="/v1/jobs",
                description="Live job status, as Server-Sent Events.")

LAST_EVENT_ID_DOC = {
    "in": "header",
    "name": "Last-Event-ID",
    "required": False,
    "schema": {"type": "string"},
    "description": (
        "The id of the last event received (browsers' EventSource sends it when they "
        "reconnect): only the events after it are sent. Ids: `1` queued, `2` processing, "
        "`3.<permille>` progress (`3.500` is half way), `9` the end (completed, failed or "
        "cancelled). An id not written by this API is ignored: everything is sent."),
}

STREAM_DOC = {"200": {
    "description": (
        "`text/event-stream`. First `retry: 2000`, then one event per stage the job has "
        "passed (`id:`, `event:` queued, processing, progress, completed, failed or "
        "cancelled, `data:` the job as `GET /v1/jobs/{job_id}` shows it, on one line), "
        "then each new one as it happens; a `: keep-alive` comment every 15 seconds "
        "(EVENTS_KEEPALIVE_SECONDS) while nothing happens. The stream ends after the "
        "terminal event."),
    "content": {"text/event-stream": {"schema": {"type": "string"}}},
}}


def init_app(app, api) -> None:
    """Serve the streams, over a hub of this process's own (started on first use)."""
    app.extensions[HUB] = hub_for(app.extensions["runtime"])
    api.register_blueprint(blp)


def hub():
    return current_app.extensions[HUB]


def snapshot(rt, job_id, company_id):
    """The job's row and its view as `GET /v1/jobs/<id>` shows it; NotFound for another
    company's job."""
    with rt.engine.connect() as conn:
        job = jobs_uc.get_job(conn, job_id, company_id)
        position = listing.queue_position(conn, job)
    return job, jobs_uc.job_view(job, rt.storage, rt.settings.link_ttl_seconds,
                                 queue_position=position)


@blp.route("/<job_id>/events")
class JobEvents(MethodView):
    @blp.doc(responses=STREAM_DOC, parameters=[LAST_EVENT_ID_DOC])
    @blp.alt_response(401, schema=schemas.ErrorEnvelope, description="Missing or bad API key")
    @blp.alt_response(404, schema=schemas.ErrorEnvelope, description="JOB_NOT_FOUND")
    def get(self, job_id):
        """Follow a job live, as Server-Sent Events, until it ends.

        Try it with `curl -N -H "Authorization: Bearer $KEY" .../v1/jobs/<id>/events`, or
        `new EventSource(url)` behind a proxy that adds the key. On connecting, the events
        the job has already passed are sent at once (all of them, or those after
        `Last-Event-ID`), each carrying the job as it is now; then each change as it
        happens. Progress events come where the provider reports progress (ComfyUI,
        Runway, OpenAI video). Another company's job is reported as not found.
        """
        from api.jobs import parse_job_id

        rt = current_app.extensions["runtime"]
        company_id = current_principal().company_id
        job_uuid = parse_job_id(job_id)
        snapshot(rt, job_uuid, company_id)  # 404 now, in the envelope, not mid-stream
        after = jobevents.EventId.parse(request.headers.get("Last-Event-ID"))
        events = stream(rt, hub(), job_uuid, company_id, after)
        return Response(events, mimetype="text/event-stream", headers={
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # nginx: pass each event on as it comes
        })


def stream(rt, job_hub, job_id, company_id, after: jobevents.EventId | None):
    """The stream's text, an event at a time (the WSGI server writes each as it comes)."""
    yield f"retry: {RETRY_MS}\n\n"
    keepalive = rt.settings.events_keepalive_seconds
    with job_hub.watch(job_id) as watch:  # before the first read: no change falls between
        sent = after
        while True:
            try:
                job, view = snapshot(rt, job_id, company_id)
            except NotFound:  # deleted while followed (retention): nothing more to say
                return
            for event_id, event in jobevents.passed(job):
                if sent is None or event_id > sent:
                    yield frame(event_id, event, view)
                    sent = event_id
            if job.status in jobevents.TERMINAL_EVENTS:
                return
            if not watch.wait(keepalive):
                yield KEEP_ALIVE


def frame(event_id, event: str, view: dict) -> str:
    data = json.dumps(view, separators=(",", ":"), ensure_ascii=False)
    return f"id: {event_id}\nevent: {event}\ndata: {data}\n\n"
