"""The ledger audit as operators meet it: beat runs it, /metrics shows it, the CLI exits 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from sqlalchemy import text

from api import create_app
from pipeline.config import Settings
from pipeline.db import init_db
from service.runtime import build_runtime
from tests.builders import make_company, wait_for
from tests.conftest import ROOT, distributed_env

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.e2e]


def _metric(client, check: str) -> float | None:
    body = client.get("/metrics").get_data(as_text=True)
    for line in body.splitlines():
        if line.startswith(f'pipeline_ledger_audit_findings{{check="{check}"}}'):
            return float(line.split()[-1])
    return None


def test_beat_audits_the_ledger_and_metrics_and_cli_report_findings(
        empty_pg_database, redis_prefix, tmp_path, start_worker):
    env = distributed_env(tmp_path, empty_pg_database, redis_prefix,
                          storage_url=f"file://{tmp_path}/store", AUDIT_INTERVAL_SECONDS="1")
    rt = build_runtime(Settings.from_env(environ=env))
    init_db(rt.engine)
    client = create_app(rt).test_client()
    company = make_company(rt.engine, credits=5)
    start_worker(env, queues=["maintenance"], concurrency=1, beat=True)

    wait_for(lambda: _metric(client, "balance_mismatch") == 0.0, timeout=30,
             message="a clean audit in /metrics")
    cli = [sys.executable, "-m", "service.cli", "ledger", "audit"]
    clean = subprocess.run(cli, cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                           text=True, timeout=60, check=False)
    assert clean.returncode == 0, clean.stderr
    assert "ledger clean" in clean.stdout

    with rt.engine.begin() as conn:  # money from nowhere: no transaction behind it
        conn.execute(text("UPDATE wallets SET credits_available = credits_available + 1 "
                          "WHERE company_id = :c"), {"c": company.company_id})
    wait_for(lambda: _metric(client, "balance_mismatch") == 1.0, timeout=30,
             message="the finding in /metrics")
    found = subprocess.run([*cli, "--json"], cwd=ROOT, env={**os.environ, **env},
                           capture_output=True, text=True, timeout=60, check=False)
    assert found.returncode == 2
    assert '"balance_mismatch": 1' in found.stdout
    assert str(company.wallet_id) in found.stdout
    rt.engine.dispose()
