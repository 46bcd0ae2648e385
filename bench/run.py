"""Runs the figures in order and writes bench/results/latest.json; `pipeline bench`."""

from __future__ import annotations

import sys
import tempfile
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path

from bench import report, stack
from bench.context import Context


# name -> (runs in --quick, function(ctx) -> {figure name: figure})
def _figures():
    from bench.figures import growth, latency, peer, roundtrips, slots, throughput, wallet

    return {
        "round_trips": (True, roundtrips.measure),
        "throughput_redis": (True, lambda ctx: throughput.measure(ctx, "redis")),
        "throughput_rabbitmq": (False, lambda ctx: throughput.measure(ctx, "rabbitmq")),
        "task_events": (False, lambda ctx: throughput.measure(ctx, "redis", task_events=True)),
        "hot_wallet": (True, wallet.measure),
        "api_latency": (True, latency.measure),
        "growth": (True, growth.measure),
        "gpu_utilisation": (True, slots.gpu),
        "saas_concurrency": (True, slots.saas),
        "peer_litellm": (False, peer.measure),
    }


def run(*, quick: bool, only: list[str] | None = None, jobs: int | None = None,
        repetitions: int | None = None, out: Path | None = None, log=print) -> dict:
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cp-bench-") as workdir:
        ctx = Context(Path(workdir), quick=quick, repetitions=repetitions or (2 if quick else 3),
                      jobs=jobs or (100 if quick else 300), log=log)
        result = {"started_at": datetime.now(UTC).isoformat(), "quick": quick,
                  "machine": report.machine(), "versions": report.versions(),
                  "settings": {"repetitions": ctx.repetitions, "jobs": ctx.jobs,
                               "interleaved": True}, "figures": {}}
        for name, (in_quick, measure) in _figures().items():
            if (only and name not in only) or (quick and not in_quick and not only):
                continue
            try:
                waited = stack.quiet(wait_s=0 if quick else 30)
                if waited >= 1:
                    ctx.notes.append(f"{name}: waited {waited:.0f} s for autovacuum to finish")
                result["figures"].update(measure(ctx))
            except Exception as exc:  # one figure failing leaves the others standing
                log(traceback.format_exc())
                result["figures"][name] = report.not_measured(f"{type(exc).__name__}: {exc}")
            report.write(result, out)
        result["machine"]["load_average_at_end"] = [round(v, 2) for v in
                                                     __import__("os").getloadavg()]
        result["duration_s"] = round(time.monotonic() - started, 1)
        result["notes"] = ctx.notes
    path = report.write(result, out)
    log(report.table(result))
    log(f"\nwritten to {path} in {result['duration_s']} s")
    return result


def main(argv: list[str] | None = None) -> None:
    """`python -m bench.run`: the same as `pipeline bench`."""
    from service.cli import main as pipeline

    pipeline(["bench", *(sys.argv[1:] if argv is None else argv)])


def from_arguments(args) -> int:
    run(quick=args.quick, only=args.only, jobs=args.jobs, repetitions=args.repetitions,
        out=args.out, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    main()
