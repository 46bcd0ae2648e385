"""The one base class every task shares: runtime access, job-scoped logging, failure hook."""

from __future__ import annotations

import logging
import uuid

from celery import Task

from pipeline import lifecycle, logcontext

log = logging.getLogger("pipeline.tasks")


class JobTask(Task):
    """A step of a job's chain. Its only argument is the job id."""

    abstract = True
    # Unexpected errors are recorded on the job by on_failure; nothing retries them blindly.
    max_retries = 5

    def __call__(self, job_id, *args, **kwargs):
        # Messages carry ids as strings; the use cases take UUIDs.
        job_id = uuid.UUID(str(job_id))
        # Every line the step logs carries the job and the task; the use case that loads
        # the job's row adds its company, user, provider and content type (bind_job).
        with logcontext.scope(job_id=job_id, task=self.name):
            return super().__call__(job_id, *args, **kwargs)

    @property
    def runtime(self):
        from tasks.app import runtime_of

        return runtime_of(self.app)

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        """A step died of an error we did not expect: fail the job and void its hold.

        The chain's errback does the same; both are idempotent, and this one knows the error.
        """
        try:
            job_id = uuid.UUID(str(args[0] if args else kwargs.get("job_id")))
        except ValueError:
            log.error("%s failed for a message without a valid job id", self.name)
            return
        with logcontext.scope(job_id=job_id, task=self.name):
            log.error("job %s: %s failed: %s", job_id, self.name, type(exc).__name__)
            lifecycle.fail(self.runtime.engine, job_id, code="INTERNAL_ERROR",
                           message=f"{self.name.split('.')[-1]} step failed: "
                                   f"{type(exc).__name__}")
