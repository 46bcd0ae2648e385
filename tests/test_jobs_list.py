"""GET /v1/jobs: cursor pages newest first, filters, company scoping and queue positions,
the same on PostgreSQL and on the embedded SQLite default."""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event, text, update

from api import create_app
from pipeline import listing, tables
from tests.builders import auth, make_company
from tests.conftest import _scratch_database, distributed_env, runtime_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

BASE = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
JOBS = 25
OTHERS = 3  # the other company's jobs, made in the same minutes
BACKENDS = ("postgresql", "sqlite")


@dataclass
class Made:
    """A job as the test arranged it: what each filter should see."""

    id: str
    created_at: datetime
    status: str
    content_type: str
    provider: str


def _arrange(i: int) -> dict:
    """Job i's time (three jobs a minute: ties are broken by id), status and provider."""
    return {"created_at": BASE + timedelta(minutes=i // 3),
            "status": {0: "completed", 1: "failed"}.get(i % 5, "queued"),
            "provider": "openai" if i % 4 == 3 else "local"}


class Backend:
    """One API over one database: company A with JOBS jobs, company B with OTHERS."""

    def __init__(self, env: dict):
        self.runtime = runtime_for(env)
        self.client = create_app(self.runtime).test_client()
        self.a = make_company(self.runtime.engine, credits=100_000, name="a")
        self.b = make_company(self.runtime.engine, credits=100_000, name="b")
        self.made = [self._make(self.a.api_key, i, "text" if i % 2 else "image", _arrange(i))
                     for i in range(JOBS)]
        self.others = [self._make(self.b.api_key, i, "text",
                                  {"created_at": BASE + timedelta(minutes=2 * i, seconds=1)})
                       for i in range(OTHERS)]

    def _make(self, key: str, i: int, content_type: str, values: dict) -> Made:
        settings = {"width": 64, "height": 64} if content_type == "image" else {}
        resp = self.client.post("/v1/jobs", json={"contentType": content_type,
                                                  "prompt": f"job {i}", "settings": settings,
                                                  "provider": "local"}, headers=auth(key))
        assert resp.status_code == 202, resp.get_json()
        job_id = resp.get_json()["jobId"]
        with self.runtime.engine.begin() as conn:
            conn.execute(update(tables.jobs).where(tables.jobs.c.id == uuid.UUID(job_id))
                         .values(**values))
        return Made(job_id, values["created_at"], values.get("status", "queued"), content_type,
                    values.get("provider", "local"))

    def get(self, key: str, params) -> tuple[int, dict]:
        resp = self.client.get("/v1/jobs", query_string=params, headers=auth(key))
        return resp.status_code, resp.get_json()

    def pages(self, key: str, params: dict, *, limit: int) -> list[list[dict]]:
        """Every page, following nextCursor with the same filters."""
        pages, cursor = [], None
        for _ in range(JOBS + 2):
            query = {**params, "limit": limit, **({"cursor": cursor} if cursor else {})}
            status, body = self.get(key, query)
            assert status == 200, body
            pages.append(body["jobs"])
            cursor = body["nextCursor"]
            if cursor is None:
                return pages
        raise AssertionError("the cursor never ran out")


@pytest.fixture(scope="module")
def backends(module_redis_prefix, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jobs-list")
    with _scratch_database("jobslist") as pg_url:
        made = {
            "postgresql": Backend(distributed_env(tmp / "pg", pg_url, module_redis_prefix,
                                                  storage_url=f"file://{tmp}/pg-store")),
            "sqlite": Backend({"PIPELINE_DATA_DIR": str(tmp / "embedded"),
                               "PIPELINE_ENV_FILE": str(tmp / "no.env")}),
        }
        yield made
        for backend in made.values():
            backend.runtime.engine.dispose()


def _newest_first(made: list[Made]) -> list[str]:
    # Python's UUID order is PostgreSQL's and that of SQLite's hex text alike.
    return [m.id for m in sorted(made, key=lambda m: (m.created_at, uuid.UUID(m.id)),
                                 reverse=True)]


@pytest.mark.parametrize("name", BACKENDS)
def test_pages_of_seven_cover_every_job_once_newest_first(backends, name):
    backend = backends[name]
    pages = backend.pages(backend.a.api_key, {}, limit=7)
    assert [len(p) for p in pages] == [7, 7, 7, 4]
    seen = [job["jobId"] for page in pages for job in page]
    assert seen == _newest_first(backend.made)
    stamps = [job["createdAt"] for page in pages for job in page]
    assert stamps == sorted(stamps, reverse=True)


def _iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


FILTERS = {
    "one status": ({"status": "queued"}, lambda m: m.status == "queued"),
    "statuses, comma-separated": ({"status": "completed,failed"},
                                  lambda m: m.status in ("completed", "failed")),
    "statuses, repeated": ({"status": ["completed", "failed"]},
                           lambda m: m.status in ("completed", "failed")),
    "content type": ({"contentType": "image"}, lambda m: m.content_type == "image"),
    "provider": ({"provider": "openai"}, lambda m: m.provider == "openai"),
    "created range": (
        {"createdAfter": _iso(BASE + timedelta(minutes=2, seconds=30)),
         "createdBefore": "2026-01-01T12:06:30+02:00"},
        lambda m: BASE + timedelta(minutes=2, seconds=30) < m.created_at
        < BASE + timedelta(minutes=6, seconds=30)),
    "all at once": (
        {"status": "queued,failed", "contentType": "text",
         "createdAfter": _iso(BASE + timedelta(seconds=30))},
        lambda m: m.status in ("queued", "failed") and m.content_type == "text"
        and m.created_at > BASE + timedelta(seconds=30)),
    "nothing matches": ({"contentType": "video"}, lambda m: False),
}


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("case", FILTERS, ids=list(FILTERS))
def test_each_filter_narrows_the_pages(backends, name, case):
    backend = backends[name]
    params, keep = FILTERS[case]
    expected = _newest_first([m for m in backend.made if keep(m)])
    pages = backend.pages(backend.a.api_key, params, limit=3)
    assert [job["jobId"] for page in pages for job in page] == expected
    assert all(len(page) == 3 for page in pages[:-1])


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


BAD = [
    ({"cursor": "not base64!"}, "cursor"),
    ({"cursor": _b64("hello")}, "cursor"),
    ({"cursor": _b64("2026-01-01T10:00:00|8a0e4a5e-7f0e-4d7e-9a38-5d0f3f1d2c11")}, "cursor"),
    ({"cursor": _b64("2026-01-01T10:00:00+00:00|not-a-uuid")}, "cursor"),
    ({"createdAfter": "2026-01-01T10:00:00"}, "createdAfter"),  # no timezone
    ({"createdBefore": "yesterday"}, "createdBefore"),
    ({"createdAfter": "0001-01-01T00:00:00+14:00"}, "createdAfter"),
    ({"status": "done"}, "status"),
    ({"status": ["queued", "queued,nope"]}, "status"),
    ({"contentType": "gif"}, "contentType"),
    ({"provider": "local\x00"}, "provider"),
    ({"limit": 0}, "limit"),
    ({"limit": 101}, "limit"),
]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize(("params", "field"), BAD, ids=[f"{f}={p[f]!r}" for p, f in BAD])
def test_a_bad_parameter_is_400_naming_it(backends, name, params, field):
    status, body = backends[name].get(backends[name].a.api_key, params)
    assert status == 400, body
    assert set(body) == {"error", "code", "details"}
    assert body["code"] == "VALIDATION_ERROR"
    assert body["details"]["field"] == field


@pytest.mark.parametrize("name", BACKENDS)
def test_another_companys_jobs_never_appear(backends, name):
    backend = backends[name]
    theirs = {m.id for m in backend.others}
    ours = [job["jobId"] for page in backend.pages(backend.a.api_key, {}, limit=7)
            for job in page]
    assert not theirs & set(ours)
    pages = backend.pages(backend.b.api_key, {}, limit=2)
    assert [job["jobId"] for page in pages for job in page] == _newest_first(backend.others)
    # A's cursor handed to B only narrows B's own jobs.
    _, first = backend.get(backend.a.api_key, {"limit": 1})
    status, body = backend.get(backend.b.api_key, {"cursor": first["nextCursor"]})
    assert status == 200
    assert {job["jobId"] for job in body["jobs"]} <= theirs


@pytest.mark.parametrize("name", BACKENDS)
def test_waiting_jobs_show_their_place_in_the_queue(backends, name):
    backend = backends[name]
    # Each provider has its queue, where every company's waiting jobs stand oldest first.
    expected = {}
    for provider in ("local", "openai"):
        waiting = sorted((m for m in backend.made + backend.others
                          if m.status == "queued" and m.provider == provider),
                         key=lambda m: (m.created_at, uuid.UUID(m.id)))
        expected.update({m.id: place for place, m in enumerate(waiting, start=1)})
    assert max(expected.values()) > 1
    listed = {job["jobId"]: job for page in backend.pages(backend.a.api_key, {}, limit=100)
              for job in page}
    assert len(listed) == JOBS
    for job_id, job in listed.items():
        assert job["queuePosition"] == expected.get(job_id), job["status"]
    ours = sorted(p for p in (j["queuePosition"] for j in listed.values()) if p is not None)
    assert ours == sorted(expected[m.id] for m in backend.made if m.status == "queued")
    assert {None} == {j["queuePosition"] for j in listed.values()
                      if j["status"] in ("completed", "failed")}
    for m in backend.made[:6] + backend.others:
        key = backend.a.api_key if m in backend.made else backend.b.api_key
        one = backend.client.get(f"/v1/jobs/{m.id}", headers=auth(key)).get_json()
        assert one["queuePosition"] == expected.get(m.id)


class _Statements:
    """The SQL a block sends (PostgreSQL's driver-level text and parameters), to EXPLAIN."""

    def __init__(self, engine):
        self.engine, self.sent = engine, []

    def _record(self, _conn, _cursor, statement, parameters, _context, _many):
        self.sent.append((statement, parameters))

    def __enter__(self):
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc):
        event.remove(self.engine, "before_cursor_execute", self._record)


def _plans(conn, sent) -> list[str]:
    return ["\n".join(conn.exec_driver_sql("EXPLAIN " + statement, parameters).scalars())
            for statement, parameters in sent]


@pytest.mark.postgres
def test_the_status_filter_and_queue_positions_read_their_indexes(empty_pg_database, tmp_path):
    """20,000 jobs of 20 companies, analysed: the list filtered by status goes through
    ix_jobs_company_status_created, and queue positions through the partial ix_jobs_waiting."""
    rt = runtime_for(distributed_env(tmp_path, empty_pg_database, "unused:",
                                     storage_url=f"file://{tmp_path}/store"))
    try:
        companies = [make_company(rt.engine, credits=1, name=f"c{n}") for n in range(20)]
        with rt.engine.begin() as conn:
            for company in companies:
                conn.execute(text("""
                    INSERT INTO jobs (id, company_id, provider, content_type, status, prompt,
                                      estimated_cost, updated_at, created_at)
                    SELECT gen_random_uuid(), :company, 'local', 'image',
                           CASE WHEN g % 100 = 0 THEN 'queued'
                                WHEN g % 50 = 0 THEN 'failed' ELSE 'completed' END,
                           'p', 0, now(), now() - g * interval '1 second'
                    FROM generate_series(1, 1000) AS g"""), {"company": company.company_id})
            conn.execute(text("ANALYZE jobs"))
        ours = companies[7].company_id
        with rt.engine.connect() as conn, _Statements(rt.engine) as listed:
            rows, _ = listing.list_jobs(conn, ours, limit=5,
                                        filters=listing.JobFilter(statuses=("failed",)))
        assert len(rows) == 5
        assert {r.status for r in rows} == {"failed"}
        with rt.engine.connect() as conn, _Statements(rt.engine) as placed:
            queued, _ = listing.list_jobs(conn, ours, limit=5,
                                          filters=listing.JobFilter(statuses=("queued",)))
            positions = listing.queue_positions(conn, queued)
            single = listing.queue_position(conn, queued[-1])
        assert len(positions) == 5
        assert single == positions[queued[-1].id]
        with rt.engine.connect() as conn:
            [list_plan] = _plans(conn, listed.sent)
            queue_plans = _plans(conn, placed.sent[1:])
        assert "ix_jobs_company_status_created" in list_plan, list_plan
        assert queue_plans, placed.sent
        assert all("ix_jobs_waiting" in plan for plan in queue_plans), queue_plans
    finally:
        rt.engine.dispose()
