"""A local job's generate task finishes it (tasks.steps.finish_here) and drops the chain's
finish step; when finishing there fails, the finish step is left to run as before.
Driven on PostgreSQL with the local provider; the task is a stand-in holding the
runtime and the message's chain (what Celery's tracer publishes next)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline import generation, lifecycle
from pipeline.jobs import JobRequest, Principal, get_job, submit_job
from pipeline.storage import StorageUnavailable
from tasks import names
from tasks.steps import finish_here
from tests.builders import make_company

pytestmark = pytest.mark.postgres


def _step(name: str) -> dict:
    return {"task": name, "args": [], "options": {"queue": names.PIPELINE_QUEUE}}


class _StorageDown:
    """The runtime's storage, unreachable for reads (what store needs)."""

    def __init__(self, real):
        self.real = real

    def size(self, key):
        raise StorageUnavailable("the object store is down")

    def __getattr__(self, name):
        return getattr(self.real, name)


@pytest.fixture
def generated(pg_runtime):
    """generated() -> the id of a local text job whose output the generate step stored."""
    rt = pg_runtime
    company = make_company(rt.engine, credits=10)

    def make():
        job = submit_job(rt.engine, rt.registry,
                         principal=Principal(company.company_id, company.user_id, None),
                         req=JobRequest("text", "finish me here", {}, "local"),
                         max_prompt_length=100)
        lifecycle.reserve(rt.engine, job["id"], ttl_seconds=600)
        outcome = generation.generate(rt, job["id"])
        assert outcome == generation.Continue(here=True)  # the catalogue says so for local
        return job["id"]

    return make


def _status(rt, job_id) -> str:
    with rt.engine.connect() as conn:
        return get_job(conn, job_id).status


def test_the_job_is_finished_and_the_finish_step_dropped(pg_runtime, generated):
    job_id = generated()
    chain = [_step(names.FINISH)]
    task = SimpleNamespace(runtime=pg_runtime, request=SimpleNamespace(chain=chain))
    finish_here(task, job_id)
    assert _status(pg_runtime, job_id) == "completed"
    assert task.request.chain == []
    # A redelivery finds it finished: nothing runs twice, and the step is still dropped.
    task.request.chain = [_step(names.FINISH)]
    finish_here(task, job_id)
    assert task.request.chain == []


def test_a_failure_leaves_the_finish_step_to_run(pg_runtime, generated):
    job_id = generated()
    down = SimpleNamespace(**{**vars(pg_runtime), "storage": _StorageDown(pg_runtime.storage)})
    chain = [_step(names.FINISH)]
    task = SimpleNamespace(runtime=down, request=SimpleNamespace(chain=chain))
    finish_here(task, job_id)
    assert task.request.chain == [_step(names.FINISH)]
    assert _status(pg_runtime, job_id) == "processing"
    # The finish step, run later on the pipeline queue, completes it.
    assert lifecycle.finish(pg_runtime.engine, pg_runtime.storage, job_id)
    assert _status(pg_runtime, job_id) == "completed"


def test_a_chain_whose_next_step_is_not_finish_is_left_alone(pg_runtime, generated):
    """A chain published before the finish step existed (store, then settle) keeps them:
    they find their work done."""
    job_id = generated()
    chain = [_step(names.SETTLE), _step(names.STORE)]
    task = SimpleNamespace(runtime=pg_runtime, request=SimpleNamespace(chain=chain))
    finish_here(task, job_id)
    assert _status(pg_runtime, job_id) == "completed"
    assert task.request.chain == [_step(names.SETTLE), _step(names.STORE)]
    assert lifecycle.store(pg_runtime.engine, pg_runtime.storage, job_id) is False
