"""Rows in bulk for the database figures: one job made the normal way, copied by
generate_series (a million rows in seconds, not hours of submits)."""

from __future__ import annotations

import re

from sqlalchemy import event, text

from pipeline.jobs import JobRequest, Principal, submit_job

SCANS = re.compile(r"((?:Parallel )?(?:Seq Scan|Index Scan(?: Backward)?|Index Only Scan"
                   r"(?: Backward)?|Bitmap Index Scan))(?: using (\S+))? on (\S+)")


def template_job(runtime, company) -> str:
    """One text job on the local provider, submitted through the use case; its id."""
    job = submit_job(runtime.engine, runtime.registry,
                     principal=Principal(company.company_id, company.user_id, None),
                     req=JobRequest("text", "bench template", {}, provider="local"),
                     max_prompt_length=runtime.settings.max_prompt_length)
    return str(job["id"])


def copy_jobs(engine, template: str, count: int, *, status: str = "pending",
              finished: bool = False, spread_seconds: int = 0) -> None:
    """`count` copies of the template job. `finished` ones are completed and settled, with
    their dispatch sent and hold settled, as most rows of a long-lived install are;
    `spread_seconds` spaces their creation times back from now."""
    done = "now()" if finished else "NULL"
    params = {"count": count, "status": status, "finished": finished,
              "spread": spread_seconds, "template": template}
    with engine.begin() as conn:
        conn.execute(text("""
            CREATE TEMP TABLE new_jobs ON COMMIT DROP AS
            SELECT gen_random_uuid() AS id,
                   now() - (n * CAST(:spread AS float) / greatest(:count, 1))
                           * interval '1 second' AS at
            FROM generate_series(1, :count) AS n"""), params)
        conn.execute(text(f"""
            INSERT INTO jobs (id, company_id, user_id, api_key_id, provider, content_type,
                              status, source, prompt, settings, estimated_cost, actual_cost,
                              created_at, updated_at, queued_at, completed_at, settled_at)
            SELECT n.id, t.company_id, t.user_id, t.api_key_id, t.provider, t.content_type,
                   :status, t.source, t.prompt, t.settings, t.estimated_cost,
                   CASE WHEN :finished THEN t.estimated_cost END, n.at, n.at, n.at,
                   {done}, {done}
            FROM new_jobs n, jobs t WHERE t.id = CAST(:template AS uuid)"""), params)
        conn.execute(text(f"""
            INSERT INTO job_dispatches (job_id, queue, sent_at, created_at)
            SELECT n.id, 'local', {done}, n.at FROM new_jobs n"""), params)
        if finished:
            conn.execute(text("""
                INSERT INTO credit_holds (id, wallet_id, job_id, amount, status, expires_at,
                                          closed_at)
                SELECT gen_random_uuid(), w.id, n.id, 0, 'settled', now(), now()
                FROM new_jobs n, jobs t JOIN wallets w ON w.company_id = t.company_id
                WHERE t.id = CAST(:template AS uuid)
            """), {"template": template})
        for table in ("jobs", "job_dispatches", "credit_holds"):
            conn.execute(text(f"ANALYZE {table}"))


class Statements:
    """Records the SQL an engine runs while active, to EXPLAIN it afterwards."""

    def __init__(self, engine):
        self.engine = engine
        self.seen: list[tuple[str, object]] = []

    def _record(self, conn, cursor, statement, parameters, context, executemany):  # noqa: PLR0917 (the event's signature)
        if statement.lstrip().split(None, 1)[0].upper() in ("SELECT", "UPDATE", "DELETE",
                                                             "WITH", "INSERT"):
            self.seen.append((statement, parameters))

    def __enter__(self):
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc):
        event.remove(self.engine, "before_cursor_execute", self._record)

    def plans(self) -> list[dict]:
        """Each statement's first words and the scans of its plan (index names)."""
        out = []
        with self.engine.connect() as conn:
            for statement, parameters in self.seen:
                lines = conn.exec_driver_sql("EXPLAIN " + statement, parameters).scalars().all()
                plan = "\n".join(lines)
                out.append({"statement": " ".join(statement.split())[:140],
                            "scans": [" ".join(filter(None, m)) for m in SCANS.findall(plan)]})
            conn.rollback()
        return out


def seq_scans_on(plans: list[dict], table: str) -> list[str]:
    """The statements whose plan reads `table` from end to end."""
    return [p["statement"] for p in plans
            if any(s.startswith(("Seq Scan", "Parallel Seq Scan")) and s.endswith(f"on {table}")
                   for s in p["scans"])]
