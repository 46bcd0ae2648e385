"""Figures beside their references: repetitions, min/median/max, ratios, the table."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def spread(values: list[float]) -> dict:
    """min/median/max of the repetitions, with the repetitions themselves."""
    values = [float(v) for v in values]
    if not values:
        return {"runs": [], "min": None, "median": None, "max": None}
    return {"runs": [round(v, 4) for v in values], "min": round(min(values), 4),
            "median": round(statistics.median(values), 4), "max": round(max(values), 4)}


def figure(unit: str, ours: list[float], reference: list[float] | None, *, reference_name: str,
           target: str, met, better: str = "higher", extra: dict | None = None) -> dict:
    """One figure: ours and the reference from the same repetitions (pairwise ratios).

    `met` is a function of the figure (as a dict) deciding the target, or None for a
    figure without one.
    """
    out = {"unit": unit, "better": better, "ours": spread(ours),
           "reference": {"name": reference_name, **spread(reference or [])}}
    if reference:
        out["ratio"] = spread([o / r for o, r in zip(ours, reference, strict=False) if r])
    out["target"] = target
    out["met"] = bool(met(out)) if met else None
    out.update(extra or {})
    return out


def not_measured(why: str) -> dict:
    return {"not_measured": why}


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of the values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, round(p / 100 * len(ordered) + 0.5))
    return ordered[min(rank, len(ordered)) - 1]


def machine() -> dict:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": sys.version.split()[0], "cpu_model": _cpu_model(),
            "load_average_at_start": [round(v, 2) for v in load]}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def versions() -> dict:
    out = {}
    for name in ("celery", "kombu", "redis", "psycopg", "sqlalchemy", "flask", "gunicorn"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["postgresql"] = _command(["psql", "--version"])
    out["redis-server"] = _command(["redis-server", "--version"])
    out["commit"] = _command(["git", "rev-parse", "--short", "HEAD"])
    out["uncommitted_changes"] = bool(_command(["git", "status", "--porcelain",
                                                "--untracked-files=no"]))
    return out


def _command(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False,
                              cwd=RESULTS.parent.parent).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


def write(result: dict, path: Path | None = None) -> Path:
    path = path or RESULTS / "latest.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False, default=str) + "\n")
    tmp.replace(path)
    return path


def _fmt(value) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _triple(s: dict) -> str:
    return f"{_fmt(s['min'])}/{_fmt(s['median'])}/{_fmt(s['max'])}"


def table(result: dict) -> str:
    """The figures as a plain-text table: ours and the reference as min/median/max."""
    rows = [("figure", "unit", "ours min/med/max", "reference min/med/max", "ratio med",
             "target", "met")]
    for name, fig in result["figures"].items():
        if "not_measured" in fig:
            rows.append((name, "", "not measured: " + fig["not_measured"][:60], "", "", "", ""))
            continue
        ratio = fig.get("ratio", {}).get("median")
        met = {True: "yes", False: "NO", None: ""}[fig.get("met")]
        rows.append((name, fig["unit"], _triple(fig["ours"]),
                     f"{fig['reference']['name']}: {_triple(fig['reference'])}"
                     if fig["reference"]["runs"] else "-",
                     _fmt(ratio), fig.get("target", ""), met))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
