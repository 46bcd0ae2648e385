"""One analytics row per finished job: `api_usage` (seed 002) and `metrics` (seed 000).

Written inside the transaction whose compare-and-set ends the job (settle's completion,
fail's), never beside it. That statement succeeds once per job, so a redelivered settle or
a second fail writes nothing, and the rows commit or roll back with the outcome they
describe. A late result (the provider finished after the job failed on an expired hold)
ends the job a second time, as completed: its rows replace the failed ones.
"""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy import bindparam, update
from sqlalchemy.dialects import postgresql, sqlite

from pipeline.db import aware_utc, new_id
from pipeline.tables import api_usage, metrics

# The metrics row's name; its value is the job's seconds from submission to its end.
JOB_FINISHED = "job_finished"


def finished_rows(job, *, status: str, finished_at, cost=Decimal(0),
                  usage: dict | None = None, note: dict | None = None,
                  error_code: str | None = None) -> tuple[dict, dict]:
    """The job's api_usage row and its metrics row, as record_finished writes them."""
    labels = {"status": status, "provider": job.provider, "content_type": job.content_type,
              "company_id": str(job.company_id), "error_code": error_code,
              "cost": str(cost), "estimated_cost": str(job.estimated_cost),
              "attempts": job.attempts}
    seconds = max((aware_utc(finished_at) - aware_utc(job.created_at)).total_seconds(), 0.0)
    row = {"id": new_id(), "job_id": job.id, "company_id": job.company_id,
           "provider": job.provider, "content_type": job.content_type, "usage": usage or {},
           "cost": cost,
           "metadata": {"status": status, **({"errorCode": error_code} if error_code else {}),
                        **(note or {})}}
    metric = {"id": new_id(), "name": JOB_FINISHED, "value": seconds, "labels": labels,
              "job_id": job.id, "timestamp": finished_at}
    return row, metric


def record_finished(conn, job, *, status: str, finished_at, cost=Decimal(0),
                    usage: dict | None = None, note: dict | None = None,
                    error_code: str | None = None, replace: bool = False) -> None:
    """`job` is the row as read (or returned) by the transaction that ends it; `replace`
    when it ended once already (a late result), so its rows are there to overwrite."""
    row, metric = finished_rows(job, status=status, finished_at=finished_at, cost=cost,
                                usage=usage, note=note, error_code=error_code)
    # No unique key on metrics: the job row's lock, held by the statement that ended the
    # job, serializes the two writers a job can have (fail, then a late settle). Only that
    # rare second one looks for a row to replace.
    replaced = replace and conn.execute(
        update(metrics).where(metrics.c.name == JOB_FINISHED, metrics.c.job_id == job.id)
        .values(value=metric["value"], labels=metric["labels"],
                timestamp=finished_at)).rowcount
    if not replaced and conn.dialect.name == "postgresql":
        # Both rows in one statement: the metrics row's INSERT in the upsert's WITH.
        conn.execute(_UPSERT_USAGE_WITH_METRIC,
                     {**row, **{f"m_{name}": value for name, value in metric.items()}})
        return
    if not replaced:
        conn.execute(metrics.insert(), metric)
    conn.execute(_UPSERT_USAGE[conn.dialect.name], row)


# The api_usage columns a late result's row overwrites (both upserts below).
_OVERWRITTEN = ("company_id", "provider", "content_type", "usage", "cost", "metadata")


# record_finished's two rows as CTEs (usage, metric), written only where `gate` holds:
# settle writes them in the statement that completes the job and closes its hold.
# Parameters: job_id, u_<api_usage column>, m_<metrics column> (finished_params).
def finished_ctes(gate: str) -> str:
    return f"""
    usage AS (
        INSERT INTO api_usage (id, job_id, company_id, provider, content_type, usage, cost,
                               metadata)
        SELECT CAST(:u_id AS uuid), CAST(:job_id AS uuid), CAST(:u_company_id AS uuid),
               CAST(:u_provider AS text), CAST(:u_content_type AS text),
               CAST(:u_usage AS jsonb), CAST(:u_cost AS numeric), CAST(:u_metadata AS jsonb)
        WHERE {gate}
        ON CONFLICT (job_id) DO UPDATE SET
            {", ".join(f"{name} = EXCLUDED.{name}" for name in _OVERWRITTEN)}
        RETURNING 1),
    metric AS (
        INSERT INTO metrics (id, name, value, labels, job_id, timestamp)
        SELECT CAST(:m_id AS uuid), CAST(:m_name AS text), CAST(:m_value AS double precision),
               CAST(:m_labels AS jsonb), CAST(:job_id AS uuid),
               CAST(:m_timestamp AS timestamptz)
        WHERE {gate}
        RETURNING 1)"""


# finished_ctes' typed parameters, for the statement's bindparams().
FINISHED_TYPES = [
    *(bindparam(f"u_{name}", type_=api_usage.c[name].type)
      for name in ("id", "company_id", "provider", "content_type", "usage", "cost",
                   "metadata")),
    *(bindparam(f"m_{name}", type_=metrics.c[name].type)
      for name in ("id", "name", "value", "labels", "timestamp")),
]


def finished_params(row: dict, metric: dict) -> dict:
    return {**{f"u_{name}": value for name, value in row.items() if name != "job_id"},
            **{f"m_{name}": value for name, value in metric.items() if name != "job_id"}}


def _upsert_usage(dialect):
    """The api_usage row, or the job's row overwritten (a late result): built once per
    dialect, since it runs for every finished job."""
    insert = dialect.insert(api_usage)
    return insert.on_conflict_do_update(
        index_elements=["job_id"],
        set_={name: insert.excluded[name] for name in _OVERWRITTEN})


_UPSERT_USAGE = {"postgresql": _upsert_usage(postgresql), "sqlite": _upsert_usage(sqlite)}
# m_: the metrics row's values, named apart from api_usage's columns (a parameter named as
# one of the upsert's columns would be taken for that column's value).
_UPSERT_USAGE_WITH_METRIC = _UPSERT_USAGE["postgresql"].add_cte(
    metrics.insert().values({name: bindparam(f"m_{name}", type_=metrics.c[name].type)
                             for name in ("id", "name", "value", "labels", "job_id",
                                          "timestamp")}).cte("metric"))
