"""The benchmark harness runs: one tiny figure (10 jobs through gunicorn and real workers,
beside the bare chain) writes the JSON it documents. No timing thresholds: the figures
are for `make bench`, never for a test."""

from __future__ import annotations

import json

import pytest

from bench.run import run

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.e2e]


def test_a_tiny_throughput_run_writes_its_figures(tmp_path):
    out = tmp_path / "latest.json"
    lines: list[str] = []

    result = run(quick=True, only=["throughput_redis", "hot_wallet"], jobs=10,
                 repetitions=1, out=out, log=lines.append)

    written = json.loads(out.read_text())
    assert written["figures"].keys() == result["figures"].keys()
    assert {"machine", "versions", "settings", "started_at", "duration_s"} <= written.keys()
    assert written["machine"]["cpus"] >= 1
    for name in ("throughput_redis", "cpu_per_job_redis", "one_job_latency_redis",
                 "hot_wallet"):
        fig = written["figures"][name]
        assert "not_measured" not in fig, fig
        assert len(fig["ours"]["runs"]) == 1
        assert fig["ours"]["min"] > 0
        assert fig["ours"]["min"] <= fig["ours"]["median"] <= fig["ours"]["max"]
    for name in ("throughput_redis", "hot_wallet"):
        fig = written["figures"][name]
        assert fig["reference"]["median"] > 0
        assert fig["ratio"]["median"] > 0
        assert isinstance(fig["met"], bool)
    table = lines[-2]
    assert "throughput_redis" in table
    assert "bare 4-task chain" in table


def test_a_failing_figure_is_recorded_not_raised(tmp_path, monkeypatch):
    from bench import run as bench_run

    def broken(ctx):
        raise RuntimeError("no broker here")

    monkeypatch.setattr(bench_run, "_figures", lambda: {"broken": (True, broken)})
    result = run(quick=True, out=tmp_path / "r.json", log=lambda line: None)
    assert result["figures"]["broken"] == {"not_measured": "RuntimeError: no broker here"}
