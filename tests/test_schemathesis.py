"""schemathesis against /openapi.json: every documented operation, valid and invalid
requests, on PostgreSQL and on the embedded default: never a 5xx, always our envelope."""

from __future__ import annotations

import collections

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from api import create_app
from tests.builders import make_company
from tests.conftest import _scratch_database, distributed_env, runtime_for

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

EXAMPLES_PER_MODE = 15  # x 2 modes x 21 operations: about 600 requests per backend


@pytest.fixture(scope="module", params=["postgresql", "sqlite"])
def backend(request, module_redis_prefix, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    if request.param == "sqlite":
        rt = runtime_for({"PIPELINE_DATA_DIR": str(tmp / "var"),
                          "PIPELINE_ENV_FILE": str(tmp / "no.env")})
        yield rt
        rt.engine.dispose()
        return
    with _scratch_database("fuzz") as pg_url:
        rt = runtime_for(distributed_env(tmp, pg_url, module_redis_prefix,
                                         storage_url=f"file://{tmp}/store"))
        yield rt
        rt.engine.dispose()


def test_no_generated_request_gets_a_server_error(backend):
    app = create_app(backend)
    company = make_company(backend.engine, credits=1000)
    schema = schemathesis.openapi.from_wsgi("/openapi.json", app)
    # The admin key reaches every operation, the wallet's included.
    headers = {"Authorization": f"Bearer {company.admin_key}"}
    seen: collections.Counter = collections.Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {f"{op.method.upper()} {op.path}" for op in operations} >= {
        "POST /v1/jobs", "POST /v1/wallet/deposits", "POST /v1/wallet/refunds",
        "PUT /v1/wallet/budgets", "PUT /v1/provider-keys/{provider}"}

    def fuzz(strategy, mode):
        @given(case=strategy)
        @settings(max_examples=EXAMPLES_PER_MODE, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def call(case):
            resp = case.call(headers=headers)
            seen[resp.status_code // 100] += 1
            assert resp.status_code < 500, (case.operation.label, case.body, resp.text[:300])
            if resp.status_code >= 400:
                assert set(resp.json()) == {"error", "code", "details"}, resp.text[:300]

        try:
            call()
        except Unsatisfiable:
            # An operation without parameters or body (/healthz) has no invalid request.
            if mode is not GenerationMode.NEGATIVE:
                raise

    for operation in operations:
        for mode in GenerationMode:
            fuzz(operation.as_strategy(generation_mode=mode), mode)
    # Both sides were exercised: accepted requests and refused ones.
    assert seen[2] > 50, seen
    assert seen[4] > 50, seen
